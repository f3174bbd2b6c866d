//! How one view's target tensor (tokens x dims f32) is stored: f16, or int8
//! with one f32 scale per token.
//!
//! int8 is symmetric per token: `scale = max |x| / 127`, `q = round(x / scale)`,
//! so the error of any value is at most `scale / 2` (half a step of its own
//! token's grid); a token of zeros stores scale 0 and decodes to exact zeros
//! (flat HOG / Canny patches stay exactly zero, which the loss relies on).

use serde::{Deserialize, Serialize};

/// The element type of stored targets (`stages.targets.dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half precision, 2 bytes per value.
    #[default]
    F16,
    /// 1 byte per value plus a 4-byte scale per token.
    Int8,
}

impl Dtype {
    /// The member extension a stored view uses (`KEY@V.f16`, `KEY@V.q8`).
    pub fn extension(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Int8 => "q8",
        }
    }

    /// Encoded bytes of one view of `tokens x dims` values.
    pub fn encoded_len(self, tokens: usize, dims: usize) -> usize {
        match self {
            Dtype::F16 => 2 * tokens * dims,
            Dtype::Int8 => 4 * tokens + tokens * dims,
        }
    }
}

/// Encode `values` (`tokens x dims`, row-major) as `dtype`, little-endian.
pub fn encode(values: &[f32], dims: usize, dtype: Dtype) -> Vec<u8> {
    let dims = dims.max(1);
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::Int8 => {
            let tokens = values.len() / dims;
            let mut out = Vec::with_capacity(dtype.encoded_len(tokens, dims));
            let scales: Vec<f32> = values
                .chunks_exact(dims)
                .map(|token| token.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0)
                .collect();
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            for (token, &s) in values.chunks_exact(dims).zip(&scales) {
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                out.extend(
                    token
                        .iter()
                        .map(|&x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
            out
        }
    }
}

/// Decode one stored view into `out` (`tokens x dims` f32). The length must
/// match exactly: a stored view of another shape is an error, never a silent
/// truncation.
pub fn decode_into(bytes: &[u8], dims: usize, dtype: Dtype, out: &mut [f32]) -> Result<(), String> {
    let dims = dims.max(1);
    let tokens = out.len() / dims;
    let want = dtype.encoded_len(tokens, dims);
    if bytes.len() != want || out.len() != tokens * dims {
        return Err(format!(
            "stored view has {} bytes, {} x {dims} {:?} values take {want}",
            bytes.len(),
            tokens,
            dtype
        ));
    }
    match dtype {
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::Int8 => {
            let (scales, q) = bytes.split_at(4 * tokens);
            for ((token, s), qt) in out
                .chunks_exact_mut(dims)
                .zip(scales.chunks_exact(4))
                .zip(q.chunks_exact(dims))
            {
                let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                for (o, &b) in token.iter_mut().zip(qt) {
                    *o = b as i8 as f32 * s;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<f32> {
        // Three tokens of 5: mixed signs, a zero token, large values.
        vec![
            0.5, -1.25, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, -50.0, 0.001, 7.5, -99.0,
        ]
    }

    #[test]
    fn f16_round_trip_is_within_half_precision() {
        let v = values();
        let bytes = encode(&v, 5, Dtype::F16);
        assert_eq!(bytes.len(), Dtype::F16.encoded_len(3, 5));
        let mut out = vec![0f32; v.len()];
        decode_into(&bytes, 5, Dtype::F16, &mut out).unwrap();
        for (a, b) in v.iter().zip(&out) {
            // f16 has an 11-bit significand: relative error at most 2^-11.
            assert!((a - b).abs() <= a.abs() * 4.9e-4 + 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn int8_error_is_at_most_half_a_step_of_its_token() {
        let v = values();
        let bytes = encode(&v, 5, Dtype::Int8);
        assert_eq!(bytes.len(), 3 * 4 + 15);
        let mut out = vec![0f32; v.len()];
        decode_into(&bytes, 5, Dtype::Int8, &mut out).unwrap();
        for (token, (a, b)) in v.chunks(5).zip(out.chunks(5)).enumerate() {
            let step = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= step / 2.0 + 1e-6, "token {token}: {x} vs {y}");
            }
        }
        // The zero token decodes to exact zeros.
        assert!(out[5..10].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn wrong_length_is_an_error() {
        let bytes = encode(&values(), 5, Dtype::F16);
        let mut out = vec![0f32; 10];
        assert!(decode_into(&bytes, 5, Dtype::F16, &mut out).is_err());
        assert!(decode_into(&bytes[..7], 5, Dtype::Int8, &mut [0f32; 15]).is_err());
    }
}
