//! The TCP backend: data parallelism across CPU processes (on one machine or several), with
//! the connections of a TCP [`rendezvous`]. An all-reduce sends every rank's
//! buffer to rank 0, which sums them in rank order and sends the sum back: `2 (W - 1)` messages
//! through one node, the right trade for a handful of CPU ranks and for testing the launcher,
//! the rendezvous and the rank-0-only writes where no GPU is at hand. GPU ranks use NCCL.
//!
//! Frames are `tag (u8) | elements (u64 LE) | f32 LE values`; a rank that receives a frame of
//! another operation or length reports the desynchronization instead of summing garbage.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use candle_core::Tensor;

use super::rendezvous::{self, Connections};
use super::Communicator;
use crate::error::{Error, Result};

const ALL_REDUCE: u8 = 1;
const BROADCAST: u8 = 2;

/// One rank of a TCP group.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    connections: Mutex<Connections>,
}

impl TcpCommunicator {
    /// Joins the group of `world` ranks whose rank 0 listens on `addr` (`host:port`).
    pub fn connect(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        let (connections, _) = rendezvous::tcp(addr, rank, world, &[], timeout)?;
        Ok(TcpCommunicator {
            rank,
            world,
            connections: Mutex::new(connections),
        })
    }
}

fn lost(peer: usize, e: std::io::Error) -> Error {
    Error::Distributed(format!(
        "lost rank {peer}: {e} (did that process fail? its own error is above)"
    ))
}

fn send(mut s: &TcpStream, peer: usize, tag: u8, v: &[f32]) -> Result<()> {
    let mut frame = Vec::with_capacity(9 + 4 * v.len());
    frame.push(tag);
    frame.extend((v.len() as u64).to_le_bytes());
    frame.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    s.write_all(&frame).map_err(|e| lost(peer, e))
}

/// Reads one frame straight from the socket (no read-ahead buffer: rank 0 may already have
/// sent the next frame, which a buffer dropped here would swallow).
fn recv(mut r: &TcpStream, peer: usize, tag: u8, len: usize) -> Result<Vec<f32>> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).map_err(|e| lost(peer, e))?;
    let n = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes")) as usize;
    if head[0] != tag || n != len {
        return Err(Error::Distributed(format!(
            "rank {peer} is out of step: sent operation {} of {n} values, expected {tag} of {len}",
            head[0]
        )));
    }
    let mut bytes = vec![0u8; 4 * n];
    r.read_exact(&mut bytes).map_err(|e| lost(peer, e))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

impl TcpCommunicator {
    fn exchange(&self, tag: u8, mine: Vec<f32>) -> Result<Vec<f32>> {
        let conns = self
            .connections
            .lock()
            .map_err(|_| Error::Distributed("communicator poisoned".into()))?;
        match &*conns {
            Connections::Root(peers) => {
                let mut acc = mine;
                if tag == ALL_REDUCE {
                    for (i, s) in peers.iter().enumerate() {
                        let v = recv(s, i + 1, tag, acc.len())?;
                        for (a, b) in acc.iter_mut().zip(v) {
                            *a += b;
                        }
                    }
                }
                for (i, s) in peers.iter().enumerate() {
                    send(s, i + 1, tag, &acc)?;
                }
                Ok(acc)
            }
            Connections::Worker(s) => {
                if tag == ALL_REDUCE {
                    send(s, 0, tag, &mine)?;
                }
                recv(s, 0, tag, mine.len())
            }
        }
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.exchange(ALL_REDUCE, t.to_vec1::<f32>()?)?;
        Ok(Tensor::from_vec(out, t.elem_count(), t.device())?)
    }

    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.exchange(BROADCAST, t.to_vec1::<f32>()?)?;
        Ok(Tensor::from_vec(out, t.elem_count(), t.device())?)
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_in_rank_order_and_broadcasts_over_sockets() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        std::thread::scope(|s| {
            for rank in 0..3 {
                let addr = addr.clone();
                s.spawn(move || {
                    let c =
                        TcpCommunicator::connect(&addr, rank, 3, Duration::from_secs(20)).unwrap();
                    for round in 0..20 {
                        let t = Tensor::new(&[rank as f32, round as f32], &Device::Cpu).unwrap();
                        let sum = c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(sum, vec![3.0, 3.0 * round as f32]);
                        let b = c.broadcast_from_root(&(t + 1.0).unwrap()).unwrap();
                        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![1.0, round as f32 + 1.0]);
                    }
                    // A length mismatch is reported, not summed.
                    let t = Tensor::zeros(1 + rank, candle_core::DType::F32, &Device::Cpu).unwrap();
                    if rank == 1 {
                        // Rank 1 sends 2 values where rank 0 expects 1.
                        assert!(c.all_reduce_sum(&t).is_err());
                    } else if rank == 0 {
                        let e = c.all_reduce_sum(&t).unwrap_err().to_string();
                        assert!(e.contains("out of step"), "{e}");
                    }
                });
            }
        });
    }
}
