//! decode: JPEG / PNG bytes into 8-bit RGB.
//!
//! Reference: `../shared/testvectors/photo224_normalized.npy` holds four photos
//! resized to 224 px from their decoded pixels; `augment`'s tests decode the
//! same JPEGs with this stage and resize them, and must recover those u8
//! pixels within 6 levels, mean under 0.5 (zune-jpeg and libjpeg-turbo round
//! the IDCT and the chroma upsampling differently: up to 4 levels, mean 0.07
//! to 0.34 on those photos; a wrong color conversion or upsampling is far more).
//!
//! Conversions follow what `PIL.Image.convert("RGB")` gives torchvision:
//! gray is replicated, alpha is dropped, 16-bit samples keep their high byte,
//! palettes are expanded, CMYK / YCCK JPEGs are converted by the decoder.
//!
//! Decompression bombs: the declared size is read from the header (JPEG SOF,
//! PNG IHDR) and checked against `max_pixels` *before* any pixel buffer is
//! allocated. Corrupt or truncated data is an error, never a panic: the JPEG
//! decoder runs in strict mode (like PIL without `LOAD_TRUNCATED_IMAGES`).
//!
//! Decoder choice, measured on this 2-core machine (AMD EPYC, one thread,
//! `pipeline bench data` over `shared/data/photos-*.tar`, 1024 JPEGs of about
//! 270 to 630 px): zune-jpeg, see [`DECODER_CHOICE`] for the figures.

use crate::sample::{Rgb8, StageError};
use serde::{Deserialize, Serialize};

/// Why zune-jpeg decodes our JPEGs. Measured 2026-11-26 on this 2-core
/// machine (AMD EPYC, AVX2) over the 1024 JPEGs of `shared/data/photos-*.tar`,
/// one thread, while other jobs kept the load average at 5 to 7 (so absolute
/// rates are about 2.5x below an idle core; compare the ratios):
///
/// - zune-jpeg 0.5 called directly (RGB out, strict): `pipeline bench data`
///   `decode` 917 to 1236 images per CPU-second;
/// - `image` 0.25 (`load_from_memory` + `into_rgb8`): 918 per CPU-second in
///   the same run as zune's 1004. It wraps the same zune-jpeg decoder, plus a
///   `DynamicImage` conversion, so it cannot be faster;
/// - libjpeg-turbo 2.1.5 (Debian `libturbojpeg0-dev`) through the `turbojpeg`
///   0.5 crate, alternating 2 s rounds with zune-jpeg in one scratch program:
///   turbojpeg 833 / 904 / 779 images/s against zune 938 / 731 / 656, a ratio
///   of 0.89 to 1.24: no clear win. (turbojpeg 1.x needs libturbojpeg >= 3.0,
///   which Debian 12 does not ship.) Its DCT-domain downscaling would rarely
///   apply: crops are 20-100% of images under 2 x 224 px.
///
/// So the decoder stays pure Rust: no system library for CI to install.
pub const DECODER_CHOICE: &str = "zune-jpeg (direct)";

/// `stages.decode` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Largest width x height accepted; bigger declared images are rejected
    /// before allocation. PIL's bomb limit is 89,478,485; we take 64 Mpx.
    pub max_pixels: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_pixels: 64 * 1024 * 1024,
        }
    }
}

/// Decode the image of a sample (`jpg`, `jpeg` or `png` member, sniffed by magic bytes).
pub fn apply(cfg: &Config, raw: &shards::Sample) -> Result<Rgb8, StageError> {
    let (_, bytes) = raw.first(&["jpg", "jpeg", "png"]).ok_or(StageError::NoImage)?;
    decode(cfg, bytes)
}

/// Decode JPEG or PNG bytes into RGB.
pub fn decode(cfg: &Config, bytes: &[u8]) -> Result<Rgb8, StageError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(cfg, bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(cfg, bytes)
    } else {
        Err(StageError::Corrupt("neither a JPEG nor a PNG signature".into()))
    }
}

fn check_size(cfg: &Config, width: usize, height: usize) -> Result<(), StageError> {
    if width == 0 || height == 0 {
        return Err(StageError::Corrupt(format!("empty image {width}x{height}")));
    }
    if (width as u64).saturating_mul(height as u64) > cfg.max_pixels {
        return Err(StageError::TooLarge {
            width,
            height,
            limit: cfg.max_pixels,
        });
    }
    Ok(())
}

/// JPEG through zune-jpeg: headers first, size check, then decode straight to RGB.
pub fn decode_jpeg(cfg: &Config, bytes: &[u8]) -> Result<Rgb8, StageError> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        // JPEG sizes are u16; our own pixel limit is the check that matters.
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers()
        .map_err(|e| StageError::Corrupt(format!("jpeg header: {e}")))?;
    let (width, height) = dec
        .dimensions()
        .ok_or_else(|| StageError::Corrupt("jpeg without a frame header".into()))?;
    check_size(cfg, width, height)?;
    let len = dec
        .output_buffer_size()
        .ok_or_else(|| StageError::Corrupt("jpeg size overflows".into()))?;
    if len != width * height * 3 {
        return Err(StageError::Unsupported(format!(
            "jpeg decodes to {len} bytes for {width}x{height} RGB"
        )));
    }
    // zune-jpeg pads a scan cut short with gray instead of failing; PIL
    // refuses truncated files. The end-of-image marker cannot occur inside
    // entropy-coded data (0xFF is stuffed there), so its absence after the
    // last start-of-scan means the file was cut.
    if !has_eoi_after_sos(bytes) {
        return Err(StageError::Corrupt(
            "truncated jpeg: no end-of-image marker after the scan".into(),
        ));
    }
    let mut data = vec![0u8; len];
    dec.decode_into(&mut data)
        .map_err(|e| StageError::Corrupt(format!("jpeg: {e}")))?;
    Ok(Rgb8 { width, height, data })
}

/// True when an EOI marker (FF D9) follows the first SOS marker (FF DA).
fn has_eoi_after_sos(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    // EOI normally ends the file; search from the end so trailing bytes are cheap.
    bytes[sos..].windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

/// PNG through the `png` crate: IHDR first, size check, expand palettes and
/// low bit depths, keep the high byte of 16-bit samples, then to RGB.
pub fn decode_png(cfg: &Config, bytes: &[u8]) -> Result<Rgb8, StageError> {
    use png::{ColorType, Transformations};
    let mut dec = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: (cfg.max_pixels as usize).saturating_mul(8).max(1 << 20),
        },
    );
    let header = dec
        .read_header_info()
        .map_err(|e| StageError::Corrupt(format!("png: {e}")))?;
    let (width, height) = (header.width as usize, header.height as usize);
    check_size(cfg, width, height)?;
    dec.set_transformations(Transformations::EXPAND | Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| StageError::Corrupt(format!("png: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| StageError::Corrupt("png size overflows".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| StageError::Corrupt(format!("png: {e}")))?;
    let channels = match info.color_type {
        ColorType::Grayscale => 1,
        ColorType::GrayscaleAlpha => 2,
        ColorType::Rgb => 3,
        ColorType::Rgba => 4,
        ColorType::Indexed => return Err(StageError::Unsupported("png palette was not expanded".into())),
    };
    if info.bit_depth != png::BitDepth::Eight {
        return Err(StageError::Unsupported(format!("png bit depth {:?}", info.bit_depth)));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    let mut data = Vec::with_capacity(w * h * 3);
    for row in buf.chunks(stride).take(h) {
        let row = &row[..w * channels];
        match channels {
            3 => data.extend_from_slice(row),
            4 => row.chunks_exact(4).for_each(|p| data.extend_from_slice(&p[..3])),
            // Gray (with or without alpha): replicate the gray value.
            _ => row
                .chunks_exact(channels)
                .for_each(|p| data.extend_from_slice(&[p[0]; 3])),
        }
    }
    if data.len() != w * h * 3 {
        return Err(StageError::Corrupt("png frame shorter than its header".into()));
    }
    Ok(Rgb8 {
        width: w,
        height: h,
        data,
    })
}

/// The same bytes through the `image` crate (`load_from_memory` + `into_rgb8`):
/// only for the decoder comparison in `pipeline bench data`.
pub fn decode_with_image_crate(bytes: &[u8]) -> Result<Rgb8, StageError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| StageError::Corrupt(e.to_string()))?
        .into_rgb8();
    let (width, height) = (img.width() as usize, img.height() as usize);
    Ok(Rgb8 {
        width,
        height,
        data: img.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, width, height);
            enc.set_color(color);
            enc.set_depth(depth);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(data).unwrap();
        }
        out
    }

    #[test]
    fn png_gray_alpha_16bit_convert_like_pil() {
        use png::{BitDepth, ColorType};
        let cfg = Config::default();
        // 2x1 gray: replicated.
        let img = decode(
            &cfg,
            &png_bytes(2, 1, ColorType::Grayscale, BitDepth::Eight, &[10, 200]),
        )
        .unwrap();
        assert_eq!(img.data, vec![10, 10, 10, 200, 200, 200]);
        // RGBA: alpha dropped, color kept.
        let img = decode(&cfg, &png_bytes(1, 1, ColorType::Rgba, BitDepth::Eight, &[1, 2, 3, 0])).unwrap();
        assert_eq!(img.data, vec![1, 2, 3]);
        // Gray + alpha.
        let img = decode(
            &cfg,
            &png_bytes(1, 1, ColorType::GrayscaleAlpha, BitDepth::Eight, &[77, 9]),
        )
        .unwrap();
        assert_eq!(img.data, vec![77, 77, 77]);
        // 16-bit RGB, big-endian samples: the high byte survives.
        let img = decode(
            &cfg,
            &png_bytes(
                1,
                1,
                ColorType::Rgb,
                BitDepth::Sixteen,
                &[0x12, 0x34, 0xAB, 0xCD, 0xFF, 0x00],
            ),
        )
        .unwrap();
        assert_eq!(img.data, vec![0x12, 0xAB, 0xFF]);
        // 16-bit gray.
        let img = decode(
            &cfg,
            &png_bytes(1, 1, ColorType::Grayscale, BitDepth::Sixteen, &[0x80, 0x01]),
        )
        .unwrap();
        assert_eq!(img.data, vec![0x80; 3]);
        // 1-bit gray expands to 0 / 255.
        let img = decode(
            &cfg,
            &png_bytes(8, 1, ColorType::Grayscale, BitDepth::One, &[0b1000_0001]),
        )
        .unwrap();
        assert_eq!(&img.data[..3], &[255, 255, 255]);
        assert_eq!(&img.data[3..6], &[0, 0, 0]);
        assert_eq!(&img.data[21..24], &[255, 255, 255]);
    }

    #[test]
    fn png_palette_expands() {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 2, 1);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![255, 0, 0, 0, 0, 255]);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[1, 0]).unwrap();
        }
        let img = decode(&Config::default(), &out).unwrap();
        assert_eq!(img.data, vec![0, 0, 255, 255, 0, 0]);
    }

    /// A JPEG written by the `image` crate's encoder (an independent encoder)
    /// decodes to about the same pixels: gray replicated, colors within the
    /// quality-100 round-trip error.
    #[test]
    fn jpeg_gray_and_color_round_trip() {
        use image::codecs::jpeg::JpegEncoder;
        let (w, h) = (32u32, 24u32);
        let gray: Vec<u8> = (0..w * h).map(|i| ((i % w) * 8) as u8).collect();
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 100)
            .encode(&gray, w, h, image::ExtendedColorType::L8)
            .unwrap();
        let img = decode(&Config::default(), &bytes).unwrap();
        assert_eq!((img.width, img.height), (32, 24));
        for (i, p) in img.data.chunks_exact(3).enumerate() {
            assert_eq!(p[0], p[1]);
            assert_eq!(p[1], p[2]);
            assert!(
                (p[0] as i32 - gray[i] as i32).abs() <= 3,
                "pixel {i}: {} vs {}",
                p[0],
                gray[i]
            );
        }
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| if i % 3 == 0 { 200 } else { 40 }).collect();
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 100)
            .encode(&rgb, w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        let img = decode(&Config::default(), &bytes).unwrap();
        for p in img.data.chunks_exact(3) {
            assert!((p[0] as i32 - 200).abs() <= 3 && (p[1] as i32 - 40).abs() <= 3, "{p:?}");
        }
    }

    fn sample_jpeg() -> Vec<u8> {
        use image::codecs::jpeg::JpegEncoder;
        let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode(&rgb, 64, 64, image::ExtendedColorType::Rgb8)
            .unwrap();
        bytes
    }

    #[test]
    fn corrupt_and_truncated_images_are_errors_not_panics() {
        let cfg = Config::default();
        let jpeg = sample_jpeg();
        assert!(decode(&cfg, &jpeg).is_ok());
        // Truncated at many points: every prefix is an error (or, for a prefix
        // that holds the whole scan, a valid image), never a panic.
        for cut in (2..jpeg.len() - 2).step_by(37) {
            match decode(&cfg, &jpeg[..cut]) {
                Err(StageError::Corrupt(_)) => {}
                other => panic!("prefix {cut}: {other:?}"),
            }
        }
        // Garbage in the entropy-coded data and in the headers.
        let mut bad = jpeg.clone();
        for b in bad[2..40].iter_mut() {
            *b = 0xFF;
        }
        assert!(decode(&cfg, &bad).is_err());
        assert!(decode(&cfg, b"\xFF\xD8\xFF").is_err());
        assert!(matches!(decode(&cfg, b"GIF89a"), Err(StageError::Corrupt(_))));
        assert!(decode(&cfg, &[]).is_err());
        // Truncated PNG.
        let png = png_bytes(16, 16, png::ColorType::Rgb, png::BitDepth::Eight, &[9; 16 * 16 * 3]);
        assert!(decode(&cfg, &png).is_ok());
        for cut in [8, 20, 33, png.len() / 2, png.len() - 13] {
            assert!(decode(&cfg, &png[..cut]).is_err(), "png prefix {cut}");
        }
    }

    #[test]
    fn declared_huge_sizes_are_rejected_before_allocating() {
        let cfg = Config::default();
        // A PNG whose IHDR claims 60000 x 60000 but holds a few bytes of data:
        // the check must fire from the header alone (3.6 Gpx would need 10 GB).
        let mut png = png_bytes(1, 1, png::ColorType::Rgb, png::BitDepth::Eight, &[1, 2, 3]);
        set_png_size(&mut png, 60_000, 60_000);
        match decode(&cfg, &png) {
            Err(StageError::TooLarge {
                width: 60_000,
                height: 60_000,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The same for a JPEG whose SOF0 claims 65000 x 65000.
        let mut jpeg = sample_jpeg();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
        jpeg[sof + 5..sof + 7].copy_from_slice(&65_000u16.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&65_000u16.to_be_bytes());
        match decode(&cfg, &jpeg) {
            Err(StageError::TooLarge {
                width: 65_000,
                height: 65_000,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // A small limit rejects an ordinary image too.
        let tight = Config { max_pixels: 100 };
        assert!(matches!(
            decode(&tight, &sample_jpeg()),
            Err(StageError::TooLarge { .. })
        ));
    }

    /// Rewrite a PNG's IHDR width / height and fix its CRC.
    fn set_png_size(png: &mut [u8], width: u32, height: u32) {
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A CMYK JPEG (Adobe APP14, inverted, as Pillow and Photoshop write it;
    /// made by `stages/tests/data/make_fixtures.py`): solid quadrants whose
    /// RGB is the same under every CMYK convention.
    #[test]
    fn cmyk_jpeg_converts_to_rgb() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/cmyk.jpg");
        let bytes = std::fs::read(path).unwrap();
        let img = decode(&Config::default(), &bytes).unwrap();
        assert_eq!((img.width, img.height), (32, 32));
        for ((x, y), want) in [
            ((4, 4), [255, 255, 255]),
            ((20, 4), [255, 0, 0]),
            ((4, 20), [0, 0, 255]),
            ((20, 20), [0, 0, 0]),
        ] {
            for c in 0..3 {
                let got = img.at(x, y, c) as i32;
                assert!(
                    (got - want[c]).abs() <= 8,
                    "({x},{y}) channel {c}: {got} vs {}",
                    want[c]
                );
            }
        }
    }

    #[test]
    fn sample_without_image_is_an_error() {
        let s = shards::Sample::new("k").with("cls", b"3".to_vec());
        assert_eq!(apply(&Config::default(), &s), Err(StageError::NoImage));
    }
}
