//! Flat tensor payloads: parameters and gradients as raw little-endian bytes, checked before use.
//!
//! Tensors never go through serde: a frame's header says the dtype and element count, the payload is the
//! bytes. [`decode_f32`] refuses a payload whose length, dtype or values do not fit what is expected.
//!
//! Gradients may travel as bf16 or f16 (`cluster.grad_dtype`), half the bytes of f32. Both round to
//! nearest, ties to even; f16 saturates at ±65504 instead of overflowing to infinity (a gradient that
//! large is clipped by the coordinator anyway), so a finite f32 always encodes to a finite half. Values
//! are widened back to f32 on arrival, before validation and aggregation.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Element type of a payload on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    /// bfloat16: f32's exponent range, 8 significant bits.
    Bf16,
    /// IEEE half: 11 significant bits, largest finite 65504.
    F16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// Little-endian bytes of `values` as `dtype` (rounded to nearest even for the halves).
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => encode_f32(values),
        Dtype::Bf16 => values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect(),
    }
}

/// bfloat16 bits of `x`, rounded to nearest, ties to even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The magnitude from which rounding to f16 would reach infinity (halfway past the largest finite
/// half, 65504 = bits 0x7BFF, which is what such values saturate to).
const F16_OVERFLOW: f32 = 65520.0;

/// IEEE half bits of `x`, rounded to nearest, ties to even; saturates at ±65504 (NaN stays NaN).
pub fn f32_to_f16(x: f32) -> u16 {
    let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7E00;
    }
    if a >= F16_OVERFLOW {
        return sign | 0x7BFF;
    }
    if a < 6.103_515_6e-5 {
        // Subnormal (or zero): a multiple of 2^-24. A result of 1024 is the smallest normal's encoding.
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    let bits = a.to_bits();
    let exponent = ((bits >> 23) as i32 - 127 + 15) as u32;
    let mantissa = bits & 0x7F_FFFF;
    let mut m = mantissa >> 13;
    let rest = mantissa & 0x1FFF;
    if rest > 0x1000 || (rest == 0x1000 && m & 1 == 1) {
        m += 1;
    }
    // A mantissa that rounds up to 1024 carries into the exponent, which the encoding does by itself.
    sign | ((exponent << 10) + m) as u16
}

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((h >> 10) & 0x1F) as i32;
    let mantissa = (h & 0x3FF) as f32;
    match exponent {
        0 => sign * mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + mantissa / 1024.0) * 2f32.powi(e - 15),
    }
}

/// The largest |x − decode(encode(x))| / |x| over `values` (0 where x is 0): the rounding a wire dtype
/// costs, measured.
pub fn max_relative_rounding(values: &[f32], dtype: Dtype) -> f64 {
    let bytes = encode(values, dtype);
    match decode_f32(&bytes, dtype, values.len()) {
        Ok(back) => values
            .iter()
            .zip(&back)
            .filter(|(x, _)| **x != 0.0)
            .map(|(x, y)| ((x - y).abs() / x.abs()) as f64)
            .fold(0.0, f64::max),
        Err(_) => f64::INFINITY,
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
    let mut decoder = Decoder::new(dtype, expected, bytes.len() as u64)?;
    decoder.push(bytes);
    decoder.finish()
}

/// Decodes a payload as its bytes arrive, in chunks split anywhere, so that a large gradient is never
/// held twice (as bytes and as values). Wrong lengths are refused before anything is allocated; the
/// first non-finite value is remembered and later bytes are only counted.
pub struct Decoder {
    dtype: Dtype,
    expected: usize,
    out: Vec<f32>,
    /// Bytes of an element split across chunks.
    carry: [u8; 4],
    carry_len: usize,
    /// Values pushed so far, kept or not (more than `expected` is refused by `finish`).
    seen: usize,
    error: Option<TensorError>,
}

/// Values reserved up front; beyond this the vector grows with what actually arrives (a peer cannot make
/// us allocate by merely announcing a length).
const DECODE_PREALLOC: usize = 1 << 18;

impl Decoder {
    /// A decoder for a payload of `payload_len` bytes that must hold `expected` values of `dtype`.
    pub fn new(dtype: Dtype, expected: usize, payload_len: u64) -> Result<Decoder, TensorError> {
        let size = dtype.size() as u64;
        if !payload_len.is_multiple_of(size) {
            return Err(TensorError::Ragged { bytes: payload_len as usize, dtype });
        }
        let got = payload_len / size;
        if got != expected as u64 {
            return Err(TensorError::WrongLength { expected, got: got as usize });
        }
        Ok(Decoder {
            dtype,
            expected,
            out: Vec::with_capacity(expected.min(DECODE_PREALLOC)),
            carry: [0; 4],
            carry_len: 0,
            seen: 0,
            error: None,
        })
    }

    /// Decodes the next bytes of the payload.
    pub fn push(&mut self, mut bytes: &[u8]) {
        let size = self.dtype.size();
        if self.carry_len > 0 {
            let take = (size - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < size {
                return;
            }
            let carry = self.carry;
            self.carry_len = 0;
            self.value(&carry[..size]);
        }
        let whole = bytes.len() / size * size;
        for chunk in bytes[..whole].chunks_exact(size) {
            self.value(chunk);
        }
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    fn value(&mut self, chunk: &[u8]) {
        self.seen = self.seen.saturating_add(1);
        if self.error.is_some() {
            return;
        }
        let value = match self.dtype {
            Dtype::F32 => f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
            Dtype::Bf16 => bf16_to_f32(u16::from_le_bytes([chunk[0], chunk[1]])),
            Dtype::F16 => f16_to_f32(u16::from_le_bytes([chunk[0], chunk[1]])),
        };
        if value.is_finite() && self.out.len() < self.expected {
            if self.out.len() == self.out.capacity() {
                // Doubling, but never past the announced length: a 100M gradient takes 400 MB, not 537.
                let more = self.out.capacity().max(1).min(self.expected - self.out.len());
                self.out.reserve_exact(more);
            }
            self.out.push(value);
        } else if !value.is_finite() {
            self.error = Some(TensorError::NonFinite { index: self.out.len(), value });
            self.out = Vec::new();
        }
    }

    /// The values, or why they are refused (also when fewer bytes came than announced).
    pub fn finish(self) -> Result<Vec<f32>, TensorError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.seen != self.expected || self.carry_len != 0 {
            return Err(TensorError::WrongLength { expected: self.expected, got: self.seen });
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_gradient_takes_exactly_its_size() {
        let n = DECODE_PREALLOC * 3 + 5;
        let bytes = encode_f32(&vec![0.5; n]);
        let mut d = Decoder::new(Dtype::F32, n, bytes.len() as u64).unwrap();
        for chunk in bytes.chunks(1 << 16) {
            d.push(chunk);
        }
        let v = d.finish().unwrap();
        assert_eq!((v.len(), v.capacity()), (n, n));
    }

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

    #[test]
    fn more_or_fewer_bytes_than_announced_are_refused() {
        let b = encode_f32(&[1.0, 2.0, 3.0]);
        let mut d = Decoder::new(Dtype::F32, 2, 8).unwrap();
        d.push(&b);
        assert_eq!(d.finish(), Err(TensorError::WrongLength { expected: 2, got: 3 }));
        let mut d = Decoder::new(Dtype::F32, 2, 8).unwrap();
        d.push(&b[..6]);
        assert_eq!(d.finish(), Err(TensorError::WrongLength { expected: 2, got: 1 }));
    }

    /// Chunks split anywhere (inside elements too) decode exactly as the whole payload does.
    #[test]
    fn decoding_in_chunks_equals_decoding_at_once() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let bytes = encode(&v, dtype);
            let whole = decode_f32(&bytes, dtype, v.len()).unwrap();
            for step in [1usize, 3, 5, 7, 4096] {
                let mut d = Decoder::new(dtype, v.len(), bytes.len() as u64).unwrap();
                for chunk in bytes.chunks(step) {
                    d.push(chunk);
                }
                assert_eq!(d.finish().unwrap(), whole, "{dtype:?} in chunks of {step}");
            }
            let mut short = Decoder::new(dtype, v.len(), bytes.len() as u64).unwrap();
            short.push(&bytes[..bytes.len() - 1]);
            assert!(matches!(short.finish(), Err(TensorError::WrongLength { .. })), "a truncated payload");
        }
        let mut bad = encode(&v, Dtype::F32);
        bad[400..404].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut d = Decoder::new(Dtype::F32, v.len(), bad.len() as u64).unwrap();
        for chunk in bad.chunks(3) {
            d.push(chunk);
        }
        assert!(matches!(d.finish(), Err(TensorError::NonFinite { index: 100, .. })));
        // Wrong sizes are refused before any allocation.
        assert!(matches!(Decoder::new(Dtype::F32, 10, 1 << 40), Err(TensorError::WrongLength { .. })));
        assert!(matches!(Decoder::new(Dtype::Bf16, 10, 21), Err(TensorError::Ragged { .. })));
    }

    /// Exhaustive over every half bit pattern: decode → encode is the identity on finite values, and the
    /// decoded values agree with the format's definition at the edges.
    #[test]
    fn halves_round_trip_every_finite_value() {
        for h in 0..=u16::MAX {
            for (dtype, to, from) in [
                (Dtype::Bf16, f32_to_bf16 as fn(f32) -> u16, bf16_to_f32 as fn(u16) -> f32),
                (Dtype::F16, f32_to_f16, f16_to_f32),
            ] {
                let x = from(h);
                if x.is_finite() {
                    assert_eq!(to(x), h, "{dtype:?} {h:#06x} -> {x} -> {:#06x}", to(x));
                }
            }
        }
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
    }

    #[test]
    fn halves_round_to_nearest_even_and_f16_saturates() {
        // 1 + 2^-11 lies halfway between f16's 1 and 1 + 2^-10: ties to even (1).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_f16(1e9), 0x7BFF);
        assert_eq!(f32_to_f16(-1e9), 0xFBFF);
        assert_eq!(f32_to_f16(1e-10), 0);
        // Relative error bounds of round-to-nearest with p significant bits: 2^-p, i.e. 2^-8 (bf16) and
        // 2^-11 (f16, normal range: these values stay in [5e-4, 1.5e3]), and attained within a factor 4.
        let v: Vec<f32> = (1..2000).map(|i| (1.0 + 0.5 * (i as f32 * 0.7311).sin()) * 10f32.powi(i % 7 - 3)).collect();
        let (b, f) = (max_relative_rounding(&v, Dtype::Bf16), max_relative_rounding(&v, Dtype::F16));
        assert!(b <= 2f64.powi(-8) && b > 2f64.powi(-10), "bf16 {b}");
        assert!(f <= 2f64.powi(-11) && f > 2f64.powi(-13), "f16 {f}");
        // f16 saturates: every finite f32 encodes to a finite half.
        let extremes = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0];
        assert!(decode_f32(&encode(&extremes, Dtype::F16), Dtype::F16, 4).is_ok());
        // bf16 keeps f32's range: f32::MAX rounds to infinity and is refused, never applied.
        assert!(matches!(
            decode_f32(&encode(&[f32::MAX], Dtype::Bf16), Dtype::Bf16, 1),
            Err(TensorError::NonFinite { .. })
        ));
    }
}
