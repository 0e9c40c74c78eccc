//! Metrics sink: one JSON object per line in `metrics.jsonl` (`{"event": "train", "step": ..,
//! "epoch": .., ...}`) and the same numbers as TensorBoard scalars (`train/bound`, ...).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::tensorboard::EventWriter;
use crate::error::{Error, Result};

/// Writes metrics to JSONL and TensorBoard (or nowhere, on data-parallel ranks other than 0).
pub struct MetricsWriter {
    sinks: Option<Sinks>,
}

struct Sinks {
    jsonl: BufWriter<File>,
    path: PathBuf,
    events: EventWriter,
    /// When both files were last flushed.
    flushed: Instant,
}

/// Longest time a logged line waits in the buffers: someone following `metrics.jsonl` (`tail -f`,
/// TensorBoard) sees each line within about this long, while fast steps logging many lines a
/// second still write in blocks.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

impl MetricsWriter {
    /// Opens (appending) `metrics.jsonl` and a new event file in `run_dir`.
    pub fn open(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsWriter {
            sinks: Some(Sinks {
                jsonl: BufWriter::new(f),
                path,
                events: EventWriter::create(run_dir)?,
                flushed: Instant::now(),
            }),
        })
    }

    /// A writer that drops everything (ranks that must not write into the run directory).
    pub fn disabled() -> Self {
        MetricsWriter { sinks: None }
    }

    /// Records one event: `fields` are numeric scalars, written as `{event}/{name}` to TensorBoard.
    pub fn log(
        &mut self,
        event: &str,
        step: u64,
        epoch: f64,
        fields: &[(&str, f64)],
    ) -> Result<()> {
        let Some(sinks) = self.sinks.as_mut() else {
            return Ok(());
        };
        let mut m = Map::new();
        m.insert("event".into(), Value::from(event));
        m.insert("step".into(), Value::from(step));
        m.insert("epoch".into(), Value::from(epoch));
        for (k, v) in fields {
            m.insert((*k).into(), super::json::float(*v));
            sinks.events.scalar(&format!("{event}/{k}"), step, *v)?;
        }
        writeln!(sinks.jsonl, "{}", Value::Object(m)).map_err(|e| Error::io(&sinks.path, e))?;
        if sinks.flushed.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Flushes both files (at checkpoints, at the end, and from [`log`](Self::log) when a line
    /// has waited `FLUSH_EVERY`).
    pub fn flush(&mut self) -> Result<()> {
        match self.sinks.as_mut() {
            Some(s) => {
                s.jsonl.flush().map_err(|e| Error::io(&s.path, e))?;
                s.flushed = Instant::now();
                s.events.flush()
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    }

    #[test]
    fn a_line_reaches_the_file_within_the_flush_interval_without_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path()).unwrap();
        w.log("train", 1, 0.0, &[("loss", 1.0)]).unwrap();
        // Just opened: the first line may wait in the buffer.
        assert_eq!(lines(dir.path()), 0, "flushed before the interval");
        std::thread::sleep(FLUSH_EVERY + Duration::from_millis(100));
        w.log("train", 2, 0.0, &[("loss", 0.5)]).unwrap();
        assert_eq!(
            lines(dir.path()),
            2,
            "lines still buffered after {FLUSH_EVERY:?}"
        );
    }
}
