//! How the ranks of a data-parallel group find each other (the role of PyTorch's `init_method`):
//!
//! * `tcp://HOST:PORT` (or `HOST:PORT`): rank 0 listens on `HOST:PORT`; every other rank
//!   connects, introduces itself (rank and world size) and receives rank 0's payload (NCCL's
//!   128-byte unique id; nothing for the TCP backend, which keeps the connections). Works across
//!   machines with `HOST` an address of rank 0's machine that the others can reach.
//! * `file:PATH`: rank 0 publishes the payload at `PATH` (on a file system every rank sees),
//!   written aside and linked into place so no rank reads half a file; the others wait for it.
//!   The file must not exist when the group starts (a stale one from an earlier run would hand
//!   out an old id); rank 0 removes it when the group is done with it.
//!
//! Every wait has a deadline, so a rank that never arrives is an error, not a hang.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"gentrnv1";

/// Where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// `host:port` of rank 0's listener.
    Tcp(String),
    /// A file on a shared file system.
    File(PathBuf),
}

impl std::str::FromStr for Rendezvous {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s
            .strip_prefix("file://")
            .or_else(|| s.strip_prefix("file:"))
        {
            if p.is_empty() {
                return Err(Error::Config("--rendezvous file: needs a path".into()));
            }
            return Ok(Rendezvous::File(PathBuf::from(p)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Rendezvous::Tcp(addr.to_string()))
            }
            _ => Err(Error::Config(format!(
                "--rendezvous {s}: expected tcp://HOST:PORT, HOST:PORT or file:PATH"
            ))),
        }
    }
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Tcp(a) => write!(f, "tcp://{a}"),
            Rendezvous::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// The connections a TCP rendezvous leaves: rank 0 holds one stream per other rank (in rank
/// order), every other rank one stream to rank 0.
pub enum Connections {
    Root(Vec<TcpStream>),
    Worker(TcpStream),
}

fn net(what: String, e: std::io::Error) -> Error {
    Error::Distributed(format!("{what}: {e}"))
}

fn check_group(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::Config(format!(
            "rank {rank} is outside a world of size {world}"
        )));
    }
    Ok(())
}

/// Meets the other ranks through rank 0's listener at `addr`. Rank 0 sends `payload` to every
/// other rank; every rank gets it back. `timeout` bounds the whole rendezvous.
pub fn tcp(
    addr: &str,
    rank: usize,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Connections, Vec<u8>)> {
    check_group(rank, world)?;
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let mut streams = accept_ranks(addr, world, deadline, timeout)?;
        let len = (payload.len() as u32).to_le_bytes();
        for (i, s) in streams.iter_mut().enumerate() {
            s.write_all(&len)
                .and_then(|_| s.write_all(payload))
                .map_err(|e| net(format!("sending the group's id to rank {}", i + 1), e))?;
        }
        return Ok((Connections::Root(streams), payload.to_vec()));
    }
    join_rank_0(addr, rank, world, deadline)
}

/// Rank 0's side: listens on `addr` until every other rank of `world` has joined (or the
/// deadline passes); returns their streams, rank 1 first.
fn accept_ranks(
    addr: &str,
    world: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let listener =
        TcpListener::bind(addr).map_err(|e| net(format!("rank 0 cannot listen on {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| net("listener".into(), e))?;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    let mut missing = world - 1;
    while missing > 0 {
        match listener.accept() {
            Ok((s, from)) => {
                let (r, s) = handshake(s, from, world)?;
                if peers[r - 1].is_some() {
                    return Err(Error::Distributed(format!("rank {r} joined twice")));
                }
                peers[r - 1] = Some(s);
                missing -= 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let absent: Vec<usize> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| i + 1)
                        .collect();
                    return Err(Error::Distributed(format!(
                        "rank(s) {absent:?} did not join {addr} within {} s",
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(net("accept".into(), e)),
        }
    }
    Ok(peers.into_iter().map(|p| p.expect("all joined")).collect())
}

/// Reads a joining rank's hello (magic, rank, world size) from `s`, accepted from `from`, and
/// checks it against this group of `world`; returns the rank and the stream, set up for the
/// collectives.
fn handshake(
    mut s: TcpStream,
    from: std::net::SocketAddr,
    world: usize,
) -> Result<(usize, TcpStream)> {
    let sock = |e| net("socket".into(), e);
    s.set_nonblocking(false).map_err(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(sock)?;
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello)
        .map_err(|e| net(format!("handshake from {from}"), e))?;
    let (r, w) = (
        u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize,
        u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize,
    );
    if &hello[..8] != MAGIC {
        return Err(Error::Distributed(format!(
            "{from} is not a gentrain rank (bad handshake)"
        )));
    }
    if w != world || r == 0 || r >= world {
        return Err(Error::Distributed(format!(
            "{from} says rank {r} of {w}; this group has world size {world}"
        )));
    }
    s.set_read_timeout(None).map_err(sock)?;
    s.set_nodelay(true).map_err(sock)?;
    Ok((r, s))
}

/// The largest group id rank 0 sends (an NCCL unique id is 128 bytes): a longer length is a
/// corrupt or foreign peer, refused before allocating.
const MAX_PAYLOAD: usize = 1 << 20;

/// A worker's side: connects to rank 0 at `addr` (retrying until the deadline), says hello, and
/// reads the group's payload.
fn join_rank_0(
    addr: &str,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> Result<(Connections, Vec<u8>)> {
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(net(
                    format!("rank {rank} could not reach rank 0 at {addr}"),
                    e,
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let io = |e| net(format!("rank {rank}: handshake with rank 0 at {addr}"), e);
    stream.set_nodelay(true).map_err(io)?;
    let mut hello = MAGIC.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    stream
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1)),
        ))
        .map_err(io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::Distributed(format!(
            "rank 0 at {addr} announced a {len}-byte group id: not a gentrain group"
        )));
    }
    let mut got = vec![0u8; len];
    stream.read_exact(&mut got).map_err(io)?;
    stream.set_read_timeout(None).map_err(io)?;
    Ok((Connections::Worker(stream), got))
}

/// Removes the rendezvous file when dropped (held by rank 0).
#[derive(Debug)]
pub struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Shares rank 0's `payload` through the file `path`; returns it on every rank, and on rank 0
/// the guard that removes the file.
pub fn file(
    path: &Path,
    rank: usize,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, Option<FileGuard>)> {
    check_group(rank, world)?;
    let mut content = MAGIC.to_vec();
    content.extend((payload.len() as u32).to_le_bytes());
    if rank == 0 {
        content.extend(payload);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, &content).map_err(|e| Error::io(&tmp, e))?;
        // hard_link fails when `path` exists: never overwrite another group's file.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        if let Err(e) = linked {
            return Err(Error::Distributed(format!(
                "rendezvous file {}: {e} (remove it if an earlier run left it)",
                path.display()
            )));
        }
        return Ok((payload.to_vec(), Some(FileGuard(path.to_path_buf()))));
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() >= 12 && &bytes[..8] == MAGIC {
                let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
                if bytes.len() == 12 + n {
                    return Ok((bytes[12..].to_vec(), None));
                }
            }
            return Err(Error::Distributed(format!(
                "rendezvous file {} is not one gentrain wrote",
                path.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Distributed(format!(
                "rank {rank}: rank 0 did not publish {} within {} s",
                path.display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_rejects_others() {
        assert_eq!(
            "tcp://h:1".parse::<Rendezvous>().unwrap(),
            Rendezvous::Tcp("h:1".into())
        );
        assert_eq!(
            "127.0.0.1:29500".parse::<Rendezvous>().unwrap(),
            Rendezvous::Tcp("127.0.0.1:29500".into())
        );
        assert_eq!(
            "file:/tmp/x".parse::<Rendezvous>().unwrap(),
            Rendezvous::File("/tmp/x".into())
        );
        for bad in ["h", "h:", ":1", "h:99999", "file:"] {
            assert!(bad.parse::<Rendezvous>().is_err(), "{bad}");
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn tcp_hands_rank_0s_payload_to_every_rank() {
        let addr = format!("127.0.0.1:{}", free_port());
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let payload = if r == 0 { vec![7u8; 128] } else { vec![] };
                        tcp(&addr, r, 3, &payload, Duration::from_secs(20))
                            .unwrap()
                            .1
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &vec![7u8; 128]));
    }

    #[test]
    fn tcp_rejects_a_rank_with_another_world_size_and_times_out() {
        let addr = format!("127.0.0.1:{}", free_port());
        let root = {
            let addr = addr.clone();
            std::thread::spawn(move || tcp(&addr, 0, 2, &[], Duration::from_secs(20)).map(|_| ()))
        };
        let _ = tcp(&addr, 1, 3, &[], Duration::from_secs(5));
        let e = root.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("world size 2"), "{e}");
        let addr = format!("127.0.0.1:{}", free_port());
        let e = tcp(&addr, 0, 2, &[], Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("did not join"), "{e}");
    }

    #[test]
    fn file_rendezvous_publishes_once_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rdv");
        let worker = {
            let path = path.clone();
            std::thread::spawn(move || file(&path, 1, 2, &[], Duration::from_secs(20)).unwrap().0)
        };
        std::thread::sleep(Duration::from_millis(100));
        let (p, guard) = file(&path, 0, 2, b"id-bytes", Duration::from_secs(5)).unwrap();
        assert_eq!(p, b"id-bytes");
        assert_eq!(worker.join().unwrap(), b"id-bytes");
        // A second group may not take over a live file.
        assert!(file(&path, 0, 2, b"other", Duration::from_secs(1)).is_err());
        drop(guard);
        assert!(!path.exists());
    }
}
