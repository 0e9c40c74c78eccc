//! The NCCL backend (feature `nccl`): one GPU per process, collectives issued on candle's
//! stream of that GPU, so they queue behind the backward pass with no host synchronization.
//! Rank 0 creates the NCCL unique id and hands it out through the [`rendezvous`]; the
//! all-reduce and broadcast are candle `CustomOp1`s whose CUDA forward calls NCCL.

use std::sync::Mutex;
use std::time::Duration;

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::rendezvous::{self, FileGuard, Rendezvous};
use super::Communicator;
use crate::error::{Error, Result};

/// cudarc's `Comm` holds a raw NCCL handle and is neither `Send` nor `Sync`. NCCL allows a
/// communicator to be used from any thread as long as calls do not overlap; the `Mutex` in
/// [`NcclCommunicator`] serializes them.
struct SharedComm(Comm);
// SAFETY: see above; every use goes through the Mutex.
unsafe impl Send for SharedComm {}
// SAFETY: as above.
unsafe impl Sync for SharedComm {}

/// One rank of an NCCL group.
pub struct NcclCommunicator {
    comm: Mutex<SharedComm>,
    rank: usize,
    world: usize,
    _file: Option<FileGuard>,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("NCCL {what}: {e:?}"))
}

impl NcclCommunicator {
    /// Joins the group on `device` (must be CUDA), meeting the other ranks at `rendezvous`.
    pub fn new(
        device: &candle_core::Device,
        rank: usize,
        world: usize,
        rendezvous: &Rendezvous,
        timeout: Duration,
    ) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(Error::Config(
                "the nccl backend needs --device cuda:N (one GPU per rank)".into(),
            ));
        };
        let mine = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        let (bytes, file) = match rendezvous {
            Rendezvous::Tcp(addr) => (rendezvous::tcp(addr, rank, world, &mine, timeout)?.1, None),
            Rendezvous::File(p) => rendezvous::file(p, rank, world, &mine, timeout)?,
        };
        if bytes.len() != 128 {
            return Err(Error::Distributed(format!(
                "rank 0 sent an NCCL id of {} bytes, expected 128",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, b) in internal.iter_mut().zip(&bytes) {
            *d = *b as std::ffi::c_char;
        }
        // NCCL picks the device from the thread's current context: make it this rank's GPU.
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err("binding the device", e))?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal))
            .map_err(|e| nccl_err("communicator init", e))?;
        Ok(NcclCommunicator {
            comm: Mutex::new(SharedComm(comm)),
            rank,
            world,
            _file: file,
        })
    }

    fn apply(&self, t: &Tensor, broadcast: bool) -> Result<Tensor> {
        let comm = self
            .comm
            .lock()
            .map_err(|_| Error::Distributed("communicator poisoned".into()))?;
        Ok(t.contiguous()?.apply_op1_no_bwd(&Collective {
            comm: &comm.0,
            broadcast,
        })?)
    }
}

/// An all-reduce (sum) or a broadcast from rank 0, as an op on the tensor's CUDA storage.
struct Collective<'a> {
    comm: &'a Comm,
    broadcast: bool,
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        if self.broadcast {
            "gentrain-nccl-broadcast"
        } else {
            "gentrain-nccl-all-reduce"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: NCCL needs tensors on a CUDA device", self.name())
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::cuda::{device, storage, view};
        let dev = device(s);
        let input = view(s, l, self.name())?;
        let n = l.shape().elem_count();
        // SAFETY: NCCL writes all n values of the output.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
        let r = if self.broadcast {
            self.comm.broadcast(Some(&input), &mut out, 0)
        } else {
            self.comm.all_reduce(&input, &mut out, &ReduceOp::Sum)
        };
        r.map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))?;
        Ok((storage(out, &dev), l.shape().clone()))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, false)
    }

    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, true)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}
