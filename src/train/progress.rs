//! Where a run stands in its schedule, in units that survive a change of batch size on resume:
//! completed epochs and the samples already drawn from the current epoch's permutation, beside
//! the global optimizer step (which keys the random streams and names checkpoints).
//!
//! A checkpoint records all three. Resumed with another batch size, the run continues the same
//! epoch's permutation from the same sample, so every epoch still sees each training row exactly
//! once, the learning-rate schedule and KL warm-up keep their epoch, and the epoch reported in
//! `metrics.jsonl` never goes backwards.

use std::ops::Range;

/// Completed epochs, samples into the current epoch, and the global step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Optimizer steps taken (the next step's index).
    pub step: u64,
    /// Completed epochs.
    pub epoch: u64,
    /// Rows of the current epoch's permutation already trained on (`0..n`).
    pub offset: usize,
}

impl Progress {
    /// The start of a fresh run.
    pub fn start() -> Self {
        Progress {
            step: 0,
            epoch: 0,
            offset: 0,
        }
    }

    /// The position a checkpoint records: `epoch` and `offset` as written, or, for checkpoints
    /// written before offsets were recorded, derived from `step` and the batch size the
    /// checkpoint was trained with (`trained_batch`) on `n` training rows.
    pub fn from_checkpoint(
        step: u64,
        epoch: u64,
        offset: Option<usize>,
        trained_batch: usize,
        n: usize,
    ) -> Self {
        match offset {
            Some(offset) => Progress {
                step,
                epoch,
                offset,
            },
            None => {
                let bs = trained_batch.clamp(1, n.max(1));
                let per_epoch = n.div_ceil(bs).max(1) as u64;
                Progress {
                    step,
                    epoch: step / per_epoch,
                    offset: ((step % per_epoch) as usize * bs).min(n),
                }
            }
        }
    }

    /// The positions in the epoch's permutation of the next batch of at most `bs` rows.
    pub fn batch_range(&self, bs: usize, n: usize) -> Range<usize> {
        self.offset..(self.offset + bs).min(n)
    }

    /// Advances past a batch of `len` rows; true when that batch completed the epoch.
    pub fn advance(&mut self, len: usize, n: usize) -> bool {
        self.step += 1;
        self.offset += len;
        if self.offset >= n {
            self.epoch += 1;
            self.offset = 0;
            true
        } else {
            false
        }
    }

    /// Epochs done, fractional: the epoch of `metrics.jsonl` and of KL warm-up. Counted in
    /// batches of `bs` (`epoch + batches done / batches per epoch`, i.e. `step / steps per epoch`
    /// as it always was) while the offset is a whole number of batches; in an epoch begun with
    /// another batch size, by rows (`epoch + offset / n`), which is never below the batch count
    /// at the same offset, so the value keeps rising across the change.
    pub fn epochs_done(&self, n: usize, bs: usize) -> f64 {
        let bs = bs.max(1);
        if self.offset % bs == 0 {
            self.epoch as f64 + (self.offset / bs) as f64 / n.div_ceil(bs).max(1) as f64
        } else {
            // An epoch begun with another batch size: the share of its rows trained.
            self.epoch as f64 + self.offset as f64 / n.max(1) as f64
        }
    }

    /// Optimizer steps left until `epochs` epochs are complete, with batches of `bs` rows.
    pub fn remaining_steps(&self, epochs: u64, bs: usize, n: usize) -> u64 {
        if self.epoch >= epochs {
            return 0;
        }
        let bs = bs.max(1);
        let this_epoch = (n - self.offset.min(n)).div_ceil(bs) as u64;
        let later = (epochs - self.epoch - 1) * n.div_ceil(bs) as u64;
        this_epoch + later
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trains `epochs` epochs from `p` with batch `bs`; returns every (epoch, rows) batch.
    fn run(
        mut p: Progress,
        epochs: u64,
        bs: usize,
        n: usize,
    ) -> (Progress, Vec<(u64, Range<usize>)>) {
        let mut batches = Vec::new();
        while p.epoch < epochs {
            let r = p.batch_range(bs, n);
            batches.push((p.epoch, r.clone()));
            p.advance(r.len(), n);
        }
        (p, batches)
    }

    #[test]
    fn a_batch_size_change_mid_epoch_continues_the_same_epoch_from_the_same_sample() {
        // The field report: 1280 rows, 10 steps of 128 (one epoch), then resumed for 2 epochs at
        // batch 64. Before, step 10 read as half-way through epoch 1 and half an epoch was
        // trained twice.
        let n = 1280;
        let (p, first) = run(Progress::start(), 1, 128, n);
        assert_eq!((p.step, p.epoch, p.offset, first.len()), (10, 1, 0, 10));
        let p = Progress::from_checkpoint(p.step, p.epoch, Some(p.offset), 128, n);
        assert_eq!(p.remaining_steps(2, 64, n), 20);
        let (end, second) = run(p, 2, 64, n);
        assert_eq!((end.step, end.epoch), (30, 2));
        assert!(second.iter().all(|(e, _)| *e == 1));
        assert_eq!(second.iter().map(|(_, r)| r.len()).sum::<usize>(), n);

        // Mid-epoch: 3 batches of 100 of 1000 rows, then batch 64 for the rest of the epoch.
        let n = 1000;
        let mut p = Progress::start();
        for _ in 0..3 {
            let r = p.batch_range(100, n);
            p.advance(r.len(), n);
        }
        let p = Progress::from_checkpoint(p.step, p.epoch, Some(p.offset), 100, n);
        let (_, rest) = run(p, 1, 64, n);
        assert_eq!(rest[0].1.start, 300);
        assert_eq!(rest.last().unwrap().1.end, n);
        assert_eq!(rest.len() as u64, p.remaining_steps(1, 64, n));
        let mut epochs_seen: Vec<f64> = vec![p.epochs_done(n, 64)];
        let mut q = p;
        for (_, r) in &rest {
            q.advance(r.len(), n);
            epochs_seen.push(q.epochs_done(n, 64));
        }
        assert!(
            epochs_seen.windows(2).all(|w| w[1] > w[0]),
            "{epochs_seen:?}"
        );
    }

    #[test]
    fn old_checkpoints_derive_the_offset_from_their_own_batch_size() {
        // 10 steps of 64 on 1000 rows (16 steps an epoch): epoch 0, 640 rows in.
        let p = Progress::from_checkpoint(10, 0, None, 64, 1000);
        assert_eq!((p.epoch, p.offset), (0, 640));
        // 16 steps: exactly one epoch.
        let p = Progress::from_checkpoint(16, 1, None, 64, 1000);
        assert_eq!((p.epoch, p.offset), (1, 0));
        // A batch larger than the data set is one batch an epoch.
        let p = Progress::from_checkpoint(3, 3, None, 5000, 1000);
        assert_eq!((p.epoch, p.offset), (3, 0));
    }

    #[test]
    fn the_same_batch_size_reproduces_the_step_arithmetic() {
        // What the loop did before, for an unchanged batch size: epoch = step / steps per epoch.
        let (n, bs) = (1000usize, 64usize);
        let mut p = Progress::start();
        for step in 0..100u64 {
            let spe = n.div_ceil(bs) as u64;
            assert_eq!((p.step, p.epoch), (step, step / spe));
            assert_eq!(p.offset, (step % spe) as usize * bs);
            assert!((p.epochs_done(n, bs) - step as f64 / spe as f64).abs() < 1e-12);
            let r = p.batch_range(bs, n);
            p.advance(r.len(), n);
        }
        assert_eq!(Progress::start().remaining_steps(3, bs, n), 48);
        assert_eq!(p.remaining_steps(3, bs, n), 0);
    }
}
