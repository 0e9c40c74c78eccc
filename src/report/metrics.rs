//! Metrics sink: one JSON object per line in `metrics.jsonl` (`{"event": "train", "step": ..,
//! "epoch": .., ...}`) and the same numbers as TensorBoard scalars (`train/bound`, ...).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::tensorboard::EventWriter;
use crate::error::{Error, Result};

/// Writes metrics to JSONL and TensorBoard.
pub struct MetricsWriter {
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
            jsonl: BufWriter::new(f),
            path,
            events: EventWriter::create(run_dir)?,
        })
    }

    /// Records one event: `fields` are numeric scalars, written as `{event}/{name}` to TensorBoard.
    pub fn log(
        &mut self,
        event: &str,
        step: u64,
        epoch: f64,
        fields: &[(&str, f64)],
    ) -> Result<()> {
        let mut m = Map::new();
        m.insert("event".into(), Value::from(event));
        m.insert("step".into(), Value::from(step));
        m.insert("epoch".into(), Value::from(epoch));
        for (k, v) in fields {
            m.insert(
                (*k).into(),
                if v.is_finite() {
                    Value::from(*v)
                } else {
                    Value::from(v.to_string())
                },
            );
            self.events.scalar(&format!("{event}/{k}"), step, *v)?;
        }
        writeln!(self.jsonl, "{}", Value::Object(m)).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }

    /// Flushes both files (called at checkpoints and at the end).
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl.flush().map_err(|e| Error::io(&self.path, e))?;
        self.events.flush()
    }
}
