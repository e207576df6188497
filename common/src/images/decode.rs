//! One PNG, from bytes to [`PIXELS`] foreground values: no file system here.
//!
//! The header's dimensions are checked against [`MAX_IMAGE_PIXELS`] before any pixel buffer is allocated.
//! The `png` crate's `EXPAND` transformation turns every PNG into 8- or 16-bit gray, gray + alpha, RGB or
//! RGBA (palettes become RGB(A), 1/2/4-bit gray is scaled to 8 bits, `tRNS` becomes alpha). Each pixel then
//! gets a luma `L = 0.299 R + 0.587 G + 0.114 B` in [0, 1] (gray: its value), its foreground
//! `F = 1 − L` when `invert` (dark ink on light paper) or `F = L`, and finally `F · alpha`: a transparent pixel is
//! background whatever its colour. The 28×28 result is [`resize_area`] of `F`.

use std::io::Read;
use std::path::Path;

use super::resize::resize_area;
use super::{ImagesError, DECODER_MEMORY_BYTES, MAX_IMAGE_PIXELS};
use crate::omniglot::PIXELS;

/// Why bytes could not become an image (the caller adds the file's name).
#[derive(Debug)]
pub(crate) enum PngProblem {
    /// Not a PNG, or a corrupt or truncated one: the decoder's words.
    Decode(String),
    /// The header declares more than [`MAX_IMAGE_PIXELS`] pixels.
    TooLarge { width: u32, height: u32 },
}

impl PngProblem {
    /// The error naming the file (or name) the bytes came from.
    pub(crate) fn named(self, path: &Path) -> ImagesError {
        let path = path.to_path_buf();
        match self {
            PngProblem::Decode(reason) => ImagesError::NotPng { path, reason },
            PngProblem::TooLarge { width, height } => {
                ImagesError::ImageTooLarge { path, width, height, max: MAX_IMAGE_PIXELS }
            }
        }
    }
}

impl From<png::DecodingError> for PngProblem {
    fn from(e: png::DecodingError) -> Self {
        PngProblem::Decode(e.to_string())
    }
}

/// Decodes the PNG in `reader` to [`PIXELS`] foreground values in [0, 1] (see the module doc).
pub(crate) fn decode_png(reader: impl Read, invert: bool) -> Result<Vec<f32>, PngProblem> {
    let mut decoder = png::Decoder::new_with_limits(reader, png::Limits { bytes: DECODER_MEMORY_BYTES });
    decoder.set_transformations(png::Transformations::EXPAND);
    decoder.set_ignore_text_chunk(true);
    let (width, height) = {
        let info = decoder.read_header_info()?;
        (info.width, info.height)
    };
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(PngProblem::TooLarge { width, height });
    }
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(PngProblem::Decode("palette left unexpanded".into())),
    };
    let wide = match frame.bit_depth {
        png::BitDepth::Eight => false,
        png::BitDepth::Sixteen => true,
        other => return Err(PngProblem::Decode(format!("bit depth {other:?} left unexpanded"))),
    };
    let bytes_per_sample = if wide { 2 } else { 1 };
    let max = if wide { 65_535u64 } else { 255 };
    let line = frame.line_size;
    let needed = line.checked_mul(h).filter(|&n| n <= buf.len() && w * channels * bytes_per_sample <= line);
    if needed.is_none() {
        return Err(PngProblem::Decode(format!("frame of {w}×{h} does not fit its buffer")));
    }
    let sample = |x: usize, y: usize, c: usize| -> u64 {
        let o = y * line + (x * channels + c) * bytes_per_sample;
        if wide {
            u64::from(u16::from_be_bytes([buf[o], buf[o + 1]]))
        } else {
            u64::from(buf[o])
        }
    };
    let scale = max as f64;
    let foreground = |x: usize, y: usize| -> f64 {
        // Luma in thousandths of `max`, exactly (so pure gray and white are exact).
        let (luma_milli, alpha) = match channels {
            1 => (1000 * sample(x, y, 0), max),
            2 => (1000 * sample(x, y, 0), sample(x, y, 1)),
            3 => (299 * sample(x, y, 0) + 587 * sample(x, y, 1) + 114 * sample(x, y, 2), max),
            _ => (299 * sample(x, y, 0) + 587 * sample(x, y, 1) + 114 * sample(x, y, 2), sample(x, y, 3)),
        };
        let luma = luma_milli as f64 / (1000.0 * scale);
        let f = if invert { 1.0 - luma } else { luma };
        f * (alpha as f64 / scale)
    };
    let mut out = resize_area(w, h, foreground);
    // Guards the documented range against rounding; the weights are non-negative and sum to one.
    out.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    debug_assert_eq!(out.len(), PIXELS);
    Ok(out)
}
