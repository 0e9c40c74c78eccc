//! Command output on stdout: the `outln!` macro, one-object JSON and merging JSON objects. Every
//! write returns an error instead of panicking when stdout is closed; `main` exits quietly on a
//! broken pipe.

/// `println!` for command output that returns an error instead of panicking when stdout is
/// closed (`trainer eval --json | head -c 1`); `main` exits quietly on a broken pipe. Use it in
/// a function returning `anyhow::Result` with `anyhow::Context` in scope.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing to stdout")?
    }};
}

use anyhow::{Context, Result};

/// Prints `v` as one JSON value on one line of stdout, non-finite floats written as
/// [`crate::report::json::to_json`] writes them.
///
/// # Errors
/// A value that does not convert to JSON (map keys that are not strings or numbers), or a failed
/// write to stdout (a broken pipe among them).
pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    outln!("{}", crate::report::json::to_json(v)?);
    Ok(())
}

/// Copies the fields of the object `extra` into the object `into` (later fields win; anything
/// that is not an object on either side is ignored).
pub(crate) fn merge(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (into.as_object_mut(), extra) {
        o.extend(e);
    }
}
