//! In-process data parallelism: `W` ranks as threads of one process, summing through shared
//! memory in rank order. It is the reference the equivalence tests run the sharding and
//! averaging math against, with no sockets or devices involved.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::Tensor;

use super::Communicator;
use crate::error::{Error, Result};

struct State {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Vec<f32>>>,
    result: Arc<Vec<f32>>,
    /// Set for good when the ranks disagreed; every later call fails.
    failure: Option<String>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    ready: Condvar,
}

/// One rank of an in-process group (see [`LocalGroup::new`]).
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// `world` communicators sharing one group; hand one to each thread.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            world: world.max(1),
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                slots: vec![None; world.max(1)],
                result: Arc::new(Vec::new()),
                failure: None,
            }),
            ready: Condvar::new(),
        });
        (0..world.max(1))
            .map(|rank| LocalGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    /// Deposits `data`; the last rank to arrive combines all slots (in rank order) with
    /// `combine`, and every rank gets the result.
    fn exchange(
        &self,
        data: Vec<f32>,
        combine: fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Arc<Vec<f32>>> {
        let poisoned = |_| Error::Distributed("a rank of the local group panicked".into());
        let mut st = self.shared.state.lock().map_err(poisoned)?;
        let generation = st.generation;
        st.slots[self.rank] = Some(data);
        st.arrived += 1;
        if st.arrived == self.shared.world {
            let all: Vec<Vec<f32>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            if all.iter().any(|v| v.len() != all[0].len()) {
                st.failure = Some(format!(
                    "ranks passed different lengths: {:?}",
                    all.iter().map(Vec::len).collect::<Vec<_>>()
                ));
            } else {
                st.result = Arc::new(combine(&all));
            }
            st.arrived = 0;
            st.generation += 1;
            self.shared.ready.notify_all();
        } else {
            while st.generation == generation {
                st = self.shared.ready.wait(st).map_err(poisoned)?;
            }
        }
        match &st.failure {
            Some(f) => Err(Error::Distributed(f.clone())),
            None => Ok(Arc::clone(&st.result)),
        }
    }
}

/// Sum in rank order.
fn sum(all: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = all[0].clone();
    for v in &all[1..] {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += b;
        }
    }
    acc
}

fn first(all: &[Vec<f32>]) -> Vec<f32> {
    all[0].clone()
}

fn roundtrip(t: &Tensor, f: impl FnOnce(Vec<f32>) -> Result<Arc<Vec<f32>>>) -> Result<Tensor> {
    let out = f(t.to_vec1::<f32>()?)?;
    Ok(Tensor::from_slice(&out[..], out.len(), t.device())?)
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        roundtrip(t, |v| self.exchange(v, sum))
    }

    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
        roundtrip(t, |v| self.exchange(v, first))
    }

    fn backend(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn all_reduce_and_broadcast_across_threads() {
        let group = LocalGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut last = (Vec::new(), Vec::new());
                        // Many rounds back to back: no rank may read another round's result.
                        for round in 0..50 {
                            let r = c.rank() as f32;
                            let t =
                                Tensor::new(&[r, 10.0 * r + round as f32], &Device::Cpu).unwrap();
                            let s = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                            assert_eq!(s, vec![3.0, 30.0 + 3.0 * round as f32]);
                            let b = c.broadcast_from_root(&t).unwrap().to_vec1::<f32>().unwrap();
                            assert_eq!(b, vec![0.0, round as f32]);
                            last = (s, b);
                        }
                        last
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.len(), 3);
    }
}
