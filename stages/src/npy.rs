//! A tiny reader and writer for numpy `.npy` files (format version 1.0 / 2.0).
//!
//! Enough for the shared test vectors (little-endian, C order, `<f4`, `<f8`,
//! `|u1`, `<i8`, `<i4`) and for `pipeline stages dump`, without pulling a
//! tensor library into the data stages. Values are returned widened to `f64`
//! so a test can compare any dtype against any computation.

use std::io::Write;

/// A decoded `.npy` array: its shape, dtype string and values (widened to f64).
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The numpy dtype descriptor, e.g. `<f4`.
    pub dtype: String,
    /// All values in C order.
    pub data: Vec<f64>,
}

/// Why a `.npy` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The bytes are not a valid `.npy` file.
    #[error("not a valid .npy file: {0}")]
    Format(String),
    /// The dtype is not one this reader knows.
    #[error("unsupported .npy dtype {0:?}")]
    Dtype(String),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Npy {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the array holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

/// Parse the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<Npy, NpyError> {
    let bad = |m: &str| NpyError::Format(m.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("short header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(NpyError::Format(format!("unknown version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| bad("header past end of file"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not UTF-8"))?;
    let dtype = dict_value(header, "descr")
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        .ok_or_else(|| bad("no descr"))?;
    if dict_value(header, "fortran_order").map(|v| v.starts_with("True")) == Some(true) {
        return Err(bad("fortran order is not supported"));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape = shape_text
        .trim()
        .trim_start_matches('(')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let body = &bytes[start + header_len..];
    let width = match dtype.as_str() {
        "<f4" | "<i4" | "<u4" => 4,
        "<f8" | "<i8" | "<u8" => 8,
        "|u1" | "|i1" | "|b1" => 1,
        "<u2" | "<i2" => 2,
        _ => return Err(NpyError::Dtype(dtype)),
    };
    if count.checked_mul(width).is_none_or(|n| body.len() < n) {
        return Err(bad("data shorter than shape"));
    }
    let chunks = body[..count * width].chunks_exact(width);
    let data: Vec<f64> = match dtype.as_str() {
        "<f4" => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        "<f8" => chunks
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        "<i4" => chunks
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        "<u4" => chunks
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        "<i8" => chunks
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        "<u8" => chunks
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
            .collect(),
        "<i2" => chunks.map(|c| i16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        "<u2" => chunks.map(|c| u16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        "|i1" => chunks.map(|c| c[0] as i8 as f64).collect(),
        _ => chunks.map(|c| c[0] as f64).collect(),
    };
    Ok(Npy { shape, dtype, data })
}

/// Read a `.npy` file.
pub fn read(path: &std::path::Path) -> Result<Npy, NpyError> {
    parse(&std::fs::read(path)?)
}

fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let rest = header.split(pat.as_str()).nth(1)?;
    Some(rest.trim_start().split(',').next()?.trim())
}

/// An element type that `.npy` writing supports.
pub trait NpyElement: Copy {
    /// numpy's dtype descriptor.
    const DESCR: &'static str;
    /// Append the little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

impl NpyElement for i64 {
    const DESCR: &'static str = "<i8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The bytes of a version 1.0 `.npy` file holding `data` with `shape`.
pub fn encode<T: NpyElement>(shape: &[usize], data: &[T]) -> Vec<u8> {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        T::DESCR,
        dims
    );
    // The header (with magic, version and length) is padded to a multiple of
    // 64 bytes and ends in a newline, as numpy writes it.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.put(&mut out);
    }
    out
}

/// Write `data` with `shape` as a `.npy` file.
pub fn write<T: NpyElement>(path: &std::path::Path, shape: &[usize], data: &[T]) -> Result<(), NpyError> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(&encode(shape, data))?;
    Ok(())
}

/// Where the shared reference material lives: `$CROSSMAE_SHARED`, else
/// `../shared` beside the repository (the layout of the work tree and of CI).
pub fn shared_dir() -> std::path::PathBuf {
    match std::env::var_os("CROSSMAE_SHARED") {
        Some(dir) => dir.into(),
        None => concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").into(),
    }
}

/// A file of `shared/testvectors`, read as `.npy` (tests only; panics with the path).
#[cfg(test)]
pub(crate) fn testvector(name: &str) -> Npy {
    let path = shared_dir().join("testvectors").join(name);
    read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The u8 pixels behind `photo224_normalized.npy` photo `i`, recovered
/// exactly by `round((x * std + mean) * 255)` (tests only).
#[cfg(test)]
pub(crate) fn photo224_pixels(i: usize) -> crate::sample::Rgb8 {
    let x = testvector("photo224_normalized.npy");
    let cfg = crate::augment::Config::default();
    let plane = 224 * 224;
    let mut img = crate::sample::Rgb8::zeros(224, 224);
    for c in 0..3 {
        for p in 0..plane {
            let v = x.data[(i * 3 + c) * plane + p] as f32;
            img.data[p * 3 + c] = ((v * cfg.std[c] + cfg.mean[c]) * 255.0).round() as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_u8_i64() {
        let f: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let back = parse(&encode(&[2, 3, 4], &f)).unwrap();
        assert_eq!(back.shape, vec![2, 3, 4]);
        assert_eq!(back.dtype, "<f4");
        assert_eq!(back.to_f32(), f);
        let u: Vec<u8> = vec![0, 1, 255];
        let back = parse(&encode(&[3], &u)).unwrap();
        assert_eq!((back.shape, back.data), (vec![3], vec![0.0, 1.0, 255.0]));
        let i: Vec<i64> = vec![-5, 7];
        assert_eq!(parse(&encode(&[1, 2], &i)).unwrap().data, vec![-5.0, 7.0]);
    }

    #[test]
    fn header_is_padded_like_numpy() {
        let bytes = encode(&[1], &[1.0f32]);
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(bytes[10 + hlen - 1], b'\n');
    }

    #[test]
    fn reads_a_numpy_written_testvector() {
        let v = testvector("masking_ids_keep.npy");
        assert_eq!(v.shape, vec![3, 49]);
        assert_eq!(v.dtype, "<i8");
        assert!(v.data.iter().all(|&x| (0.0..196.0).contains(&x)));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse(b"hello").is_err());
        assert!(parse(b"\x93NUMPY\x01\x00\xff\xff{").is_err());
    }
}
