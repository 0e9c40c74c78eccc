//! The JSON that every command prints (`--json`) and that `metrics.jsonl` holds, in one form.
//!
//! JSON has no numbers for infinities and NaN, and `serde_json` writes them as `null`, which a
//! reader cannot tell from a missing value. gentrain writes them as the strings `"inf"`, `"-inf"`
//! and `"NaN"` everywhere (Python reads them back with `float(v)`), and every finite number as a
//! JSON number.

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// `v` as a JSON number, or `"inf"`, `"-inf"`, `"NaN"` when it is not finite.
pub fn float(v: f64) -> Value {
    if v.is_finite() {
        Value::from(v)
    } else if v.is_nan() {
        Value::from("NaN")
    } else if v > 0.0 {
        Value::from("inf")
    } else {
        Value::from("-inf")
    }
}

/// Any serializable value as JSON, with non-finite floats written by [`float`] (struct fields
/// keep their names; map keys become strings).
///
/// # Errors
/// [`Error::Config`] for a value whose map keys are not strings or numbers (a programming error).
pub fn to_json(v: &impl Serialize) -> Result<Value> {
    let tree =
        serde_value::to_value(v).map_err(|e| Error::Config(format!("cannot write JSON: {e}")))?;
    convert(tree)
}

fn convert(v: serde_value::Value) -> Result<Value> {
    use serde_value::Value as V;
    Ok(match v {
        V::Bool(b) => Value::from(b),
        V::U8(n) => Value::from(n),
        V::U16(n) => Value::from(n),
        V::U32(n) => Value::from(n),
        V::U64(n) => Value::from(n),
        V::I8(n) => Value::from(n),
        V::I16(n) => Value::from(n),
        V::I32(n) => Value::from(n),
        V::I64(n) => Value::from(n),
        V::F32(x) => float(x as f64),
        V::F64(x) => float(x),
        V::Char(c) => Value::from(c.to_string()),
        V::String(s) => Value::from(s),
        V::Unit => Value::Null,
        V::Option(o) => match o {
            Some(inner) => convert(*inner)?,
            None => Value::Null,
        },
        V::Newtype(inner) => convert(*inner)?,
        V::Seq(items) => Value::Array(items.into_iter().map(convert).collect::<Result<_>>()?),
        V::Map(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let key = match convert(k)? {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    other => {
                        return Err(Error::Config(format!("cannot write JSON: map key {other}")))
                    }
                };
                out.insert(key, convert(v)?);
            }
            Value::Object(out)
        }
        V::Bytes(b) => Value::Array(b.into_iter().map(Value::from).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Report {
        nll: f64,
        stderr: f64,
        bits: Option<f64>,
        low: f32,
        k: usize,
        name: String,
        figures: std::collections::BTreeMap<String, f64>,
    }

    #[test]
    fn non_finite_numbers_are_strings_never_null() {
        let r = Report {
            nll: f64::INFINITY,
            stderr: f64::NAN,
            bits: Some(f64::NEG_INFINITY),
            low: 1.5,
            k: 3,
            name: "x".into(),
            figures: [("a".to_string(), f64::NAN), ("b".to_string(), 2.0)].into(),
        };
        let v = to_json(&r).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"bits":"-inf","figures":{"a":"NaN","b":2.0},"k":3,"low":1.5,"name":"x","nll":"inf","stderr":"NaN"}"#
        );
        // serde_json alone loses them.
        assert!(serde_json::to_value(&r).unwrap()["nll"].is_null());
    }
}
