//! Synchronous data parallelism (one process per device, as PyTorch's DistributedDataParallel;
//! Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2): every rank holds a full copy
//! of the parameters, computes gradients on its shard of each global batch, and the ranks
//! all-reduce those gradients so that every rank applies the same update.
//!
//! The update equals the single-process one on the same global batch, up to float reordering:
//!
//! * **Sharding.** Step `s` of an epoch takes the global batch `B_s` (the same slice of the
//!   epoch's seeded permutation as in a single process); rank `r` of `W` takes the contiguous
//!   rows `[r L / W, (r + 1) L / W)` of it, `L = |B_s|`. The shards are disjoint and cover the
//!   batch, also for a short last batch ([`shard`]).
//! * **Randomness.** Every per-step draw (dynamic binarization, reparameterization noise) is
//!   made for the whole global batch from the step's keyed stream and then narrowed to the
//!   rank's rows, so each row sees exactly the bits and noise it would see in one process. This
//!   costs `O(L d)` elementwise work per rank against the `O((L / W) d h)` of the model.
//! * **Averaging.** The loss is a mean over rows, so the global gradient is
//!   `sum_r (n_r / L) g_r` where `g_r` is rank `r`'s mean gradient over its `n_r` rows. Each rank
//!   scales by `n_r / L` and the ranks all-reduce a sum ([`DataParallel::average`]), in buckets
//!   of flattened gradients ([`BUCKET_ELEMENTS`]) so a model of many small tensors makes few
//!   collective calls. The loss and any logged scalars ride in the first bucket, which also makes
//!   a non-finite value on any rank non-finite on all of them: every rank skips the same updates.
//!
//! Backends ([`Communicator`]): [`local::LocalGroup`] (threads of one process, the tests'
//! reference), [`tcp::TcpCommunicator`] (processes on CPUs, star all-reduce through rank 0 over
//! TCP; it runs the whole multi-process path, launcher and rendezvous included, on machines
//! without GPUs) and, with the `nccl` feature, `nccl::NcclCommunicator` (one GPU per process).
//! [`rendezvous`] gives ranks their peers (TCP or a shared file).

use std::ops::Range;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

/// Gradient elements per all-reduce call (25 MiB of f32, PyTorch DDP's default bucket size).
pub const BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

/// A group of ranks that can sum tensors across all of them.
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The elementwise sum over ranks of the 1-D f32 tensor `t` (every rank passes the same
    /// length), on `t`'s device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0's value of the 1-D f32 tensor `t`, on every rank.
    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor>;
    /// The backend's name for logs and metadata.
    fn backend(&self) -> &'static str;
}

/// Which library carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Star all-reduce over TCP through rank 0 (CPU ranks).
    Tcp,
    /// NCCL (one GPU per rank; feature `nccl`).
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Backend::Tcp),
            "nccl" => Ok(Backend::Nccl),
            _ => Err(Error::Config(format!(
                "--backend {s}: expected tcp or nccl"
            ))),
        }
    }
}

/// How one process joins a data-parallel group.
#[derive(Debug, Clone)]
pub struct ParallelSpec {
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous: rendezvous::Rendezvous,
    pub backend: Backend,
    /// Bound on the rendezvous (every rank must have arrived by then).
    pub timeout: std::time::Duration,
}

/// Joins the group `spec` describes, with the collectives on `device` (the training device).
pub fn connect(spec: &ParallelSpec, device: &candle_core::Device) -> Result<DataParallel> {
    if spec.world_size == 0 || spec.rank >= spec.world_size {
        return Err(Error::Config(format!(
            "--rank {} is outside --world-size {}",
            spec.rank, spec.world_size
        )));
    }
    let comm: Arc<dyn Communicator> = match (spec.backend, &spec.rendezvous) {
        (Backend::Tcp, rendezvous::Rendezvous::Tcp(addr)) => {
            if !device.is_cpu() {
                return Err(Error::Config(
                    "the tcp backend moves gradients through host memory; use --backend nccl on GPUs".into(),
                ));
            }
            Arc::new(tcp::TcpCommunicator::connect(
                addr,
                spec.rank,
                spec.world_size,
                spec.timeout,
            )?)
        }
        (Backend::Tcp, rendezvous::Rendezvous::File(_)) => {
            return Err(Error::Config(
                "the tcp backend needs --rendezvous tcp://HOST:PORT (rank 0's listener)".into(),
            ))
        }
        #[cfg(feature = "nccl")]
        (Backend::Nccl, r) => Arc::new(nccl::NcclCommunicator::new(
            device,
            spec.rank,
            spec.world_size,
            r,
            spec.timeout,
        )?),
        #[cfg(not(feature = "nccl"))]
        (Backend::Nccl, _) => {
            return Err(Error::Config(
                "this trainer was built without NCCL: rebuild with --features nccl (scripts/build-cuda.sh)".into(),
            ))
        }
    };
    Ok(DataParallel::new(comm))
}

/// The rows of a global batch of `len` rows that rank `rank` of `world` trains on.
pub fn shard(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    (rank * len / world)..((rank + 1) * len / world)
}

/// Data-parallel training state of one rank: the communicator and the bucket size.
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<dyn Communicator>,
    bucket_elements: usize,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("backend", &self.comm.backend())
            .finish()
    }
}

/// The result of [`DataParallel::average`].
pub struct Averaged {
    /// The store passed in, with the gradient of every variable replaced by its global mean
    /// (variables without a gradient on this rank count as zeros).
    pub grads: GradStore,
    /// The global means of the scalars passed in, in order.
    pub scalars: Vec<Tensor>,
}

impl DataParallel {
    /// Data parallelism over `comm`.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        DataParallel {
            comm,
            bucket_elements: BUCKET_ELEMENTS,
        }
    }

    /// The same, with buckets of `elements` gradient values (tests use small ones).
    pub fn with_bucket_elements(mut self, elements: usize) -> Self {
        self.bucket_elements = elements.max(1);
        self
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    pub fn backend(&self) -> &'static str {
        self.comm.backend()
    }

    /// This rank's rows of a global batch of `len` rows.
    pub fn shard(&self, len: usize) -> Range<usize> {
        shard(len, self.rank(), self.world_size())
    }

    /// Overwrites every variable with rank 0's value (run once at start, so the ranks begin
    /// from identical parameters whatever their initialization or checkpoint).
    pub fn broadcast_parameters(&self, vars: &[Var]) -> Result<()> {
        for v in vars {
            let t = v.as_tensor();
            let flat = self.comm.broadcast_from_root(&t.flatten_all()?)?;
            v.set(&flat.reshape(t.shape())?)?;
        }
        Ok(())
    }

    /// The global means of the gradients of `vars` and of `scalars`, from this rank's means over
    /// `rows` of a global batch of `batch_rows` rows (see the module docs). Every rank must call
    /// it with the same variables in the same order.
    pub fn average(
        &self,
        vars: &[Var],
        mut grads: GradStore,
        scalars: &[Tensor],
        rows: usize,
        batch_rows: usize,
    ) -> Result<Averaged> {
        if batch_rows == 0 {
            return Err(Error::Config("data parallelism: empty global batch".into()));
        }
        let weight = rows as f64 / batch_rows as f64;
        let device = match vars.first() {
            Some(v) => v.device().clone(),
            None => return Err(Error::Config("data parallelism: no parameters".into())),
        };
        // Flatten (scalars first, then every gradient) into buckets of about bucket_elements.
        let mut pieces: Vec<Tensor> = Vec::with_capacity(scalars.len() + vars.len());
        for s in scalars {
            pieces.push(s.to_dtype(candle_core::DType::F32)?.reshape(1)?);
        }
        for v in vars {
            let t = v.as_tensor();
            pieces.push(match grads.get(t) {
                Some(g) => g.flatten_all()?,
                None => Tensor::zeros(t.elem_count(), candle_core::DType::F32, &device)?,
            });
        }
        let mut reduced: Vec<Tensor> = Vec::with_capacity(pieces.len());
        let mut start = 0;
        while start < pieces.len() {
            let mut end = start;
            let mut size = 0;
            while end < pieces.len()
                && (end == start || size + pieces[end].elem_count() <= self.bucket_elements)
            {
                size += pieces[end].elem_count();
                end += 1;
            }
            let refs: Vec<&Tensor> = pieces[start..end].iter().collect();
            let bucket = (Tensor::cat(&refs, 0)? * weight)?;
            let sum = self.comm.all_reduce_sum(&bucket)?;
            let mut offset = 0;
            for p in &pieces[start..end] {
                let n = p.elem_count();
                reduced.push(sum.narrow(0, offset, n)?);
                offset += n;
            }
            start = end;
        }
        let mut it = reduced.into_iter();
        let scalars = (&mut it)
            .take(scalars.len())
            .map(|t| Ok(t.squeeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        for (v, g) in vars.iter().zip(it) {
            grads.insert(v.as_tensor(), g.reshape(v.as_tensor().shape())?);
        }
        Ok(Averaged { grads, scalars })
    }

    /// True on every rank when `flag` is true on any rank (used to stop all ranks at the same
    /// step when a signal reached one of them).
    pub fn any(&self, flag: bool, device: &candle_core::Device) -> Result<bool> {
        let t = Tensor::new(&[if flag { 1f32 } else { 0.0 }], device)?;
        let sum = self.comm.all_reduce_sum(&t)?;
        Ok(sum.to_vec1::<f32>()?[0] > 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_every_batch() {
        for world in 1..=5 {
            for len in 0..40 {
                let mut next = 0;
                for rank in 0..world {
                    let r = shard(len, rank, world);
                    assert_eq!(r.start, next, "len {len} world {world}");
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
