//! Flat tensor payloads: parameters and gradients as raw little-endian bytes, checked before use.
//!
//! Tensors never go through serde: a frame's header says the dtype and element count, the payload is the
//! bytes. [`decode_f32`] refuses a payload whose length, dtype or values do not fit what is expected.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Element type of a payload on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum TensorError {
    #[error("payload has {got} elements, the parameter layout has {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("payload is {bytes} bytes, not a whole number of {dtype:?} elements")]
    Ragged { bytes: usize, dtype: Dtype },
    #[error("payload holds a non-finite value ({value}) at element {index}")]
    NonFinite { index: usize, value: f32 },
}

/// Little-endian bytes of `values`.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes `expected` f32 values, refusing a wrong length or any NaN/Inf.
pub fn decode_f32(bytes: &[u8], dtype: Dtype, expected: usize) -> Result<Vec<f32>, TensorError> {
    if bytes.len() % dtype.size() != 0 {
        return Err(TensorError::Ragged { bytes: bytes.len(), dtype });
    }
    let got = bytes.len() / dtype.size();
    if got != expected {
        return Err(TensorError::WrongLength { expected, got });
    }
    let mut out = Vec::with_capacity(expected);
    for (index, chunk) in bytes.chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !value.is_finite() {
            return Err(TensorError::NonFinite { index, value });
        }
        out.push(value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let v = vec![1.5f32, -2.0, 0.0, 3.25e-7];
        let b = encode_f32(&v);
        assert_eq!(decode_f32(&b, Dtype::F32, 4).unwrap(), v);
        assert_eq!(decode_f32(&b, Dtype::F32, 5), Err(TensorError::WrongLength { expected: 5, got: 4 }));
        assert!(matches!(decode_f32(&b[..7], Dtype::F32, 4), Err(TensorError::Ragged { .. })));
        let bad = encode_f32(&[1.0, f32::NAN]);
        assert!(matches!(decode_f32(&bad, Dtype::F32, 2), Err(TensorError::NonFinite { index: 1, .. })));
        let inf = encode_f32(&[f32::NEG_INFINITY]);
        assert!(matches!(decode_f32(&inf, Dtype::F32, 1), Err(TensorError::NonFinite { index: 0, .. })));
    }
}
