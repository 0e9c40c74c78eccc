//! Metrics sink: one JSON object per line in `metrics.jsonl` (`{"event": "train", "step": ..,
//! "epoch": .., ...}`) and the same numbers as TensorBoard scalars (`train/bound`, ...).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

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
}

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
        Ok(())
    }

    /// Flushes both files (called at checkpoints and at the end).
    pub fn flush(&mut self) -> Result<()> {
        match self.sinks.as_mut() {
            Some(s) => {
                s.jsonl.flush().map_err(|e| Error::io(&s.path, e))?;
                s.events.flush()
            }
            None => Ok(()),
        }
    }
}
