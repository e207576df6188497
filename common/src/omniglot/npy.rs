//! The `.npy` preamble and header-dictionary parser used by the Omniglot reader: strict (exactly the keys
//! NumPy writes), bounded (the header length is capped before it is read), and panic-free on any bytes.

use std::io::Read;

use super::*;

/// The fields of a `.npy` header dictionary.
#[derive(Debug, PartialEq)]
pub(super) struct NpyHeader {
    /// The entry it was read from (for errors).
    pub(super) entry: &'static str,
    /// `descr`: the dtype string.
    pub(super) descr: String,
    /// `fortran_order`.
    pub(super) fortran_order: bool,
    /// `shape`.
    pub(super) shape: Vec<u64>,
}

/// Reads and parses the `.npy` preamble and header of `entry`, leaving `r` at the start of the array data.
pub(super) fn read_npy_header(r: &mut impl Read, entry: &'static str) -> Result<NpyHeader, OmniglotError> {
    let mut magic = [0u8; 8];
    let got = read_full(r, &mut magic, entry)?;
    if got < NPY_MAGIC.len() || &magic[..NPY_MAGIC.len()] != NPY_MAGIC {
        return Err(OmniglotError::BadMagic { entry, found: magic[..got.min(NPY_MAGIC.len())].to_vec() });
    }
    let truncated = |expected: u64, found: u64| OmniglotError::Truncated { entry, part: "header", expected, found };
    if got < magic.len() {
        return Err(truncated(magic.len() as u64, got as u64));
    }
    let (major, minor) = (magic[6], magic[7]);
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(OmniglotError::UnsupportedVersion { entry, major, minor }),
    };
    let mut len_field = [0u8; 4];
    let got = read_full(r, &mut len_field[..len_bytes], entry)?;
    if got < len_bytes {
        return Err(truncated((magic.len() + len_bytes) as u64, (magic.len() + got) as u64));
    }
    let header_len = u32::from_le_bytes(len_field);
    if header_len as u64 > MAX_HEADER_LEN as u64 {
        return Err(OmniglotError::HeaderTooLong { entry, len: header_len.into(), max: MAX_HEADER_LEN });
    }
    let header_len = header_len as usize;
    let mut text = vec![0u8; header_len];
    let got = read_full(r, &mut text, entry)?;
    if got < header_len {
        let preamble = magic.len() + len_bytes;
        return Err(truncated((preamble + header_len) as u64, (preamble + got) as u64));
    }
    // Versions 1 and 2 are latin-1, version 3 UTF-8; anything a valid header holds is ASCII.
    let text: String = if major == 3 {
        String::from_utf8(text).map_err(|_| OmniglotError::BadHeader {
            entry,
            reason: "not valid UTF-8".into(),
            header: String::new(),
        })?
    } else {
        text.iter().map(|&b| char::from(b)).collect()
    };
    parse_header_dict(&text, entry)
}

/// Parses the Python dict literal of a `.npy` header: exactly the keys `descr` (a string), `fortran_order`
/// (`True`/`False`) and `shape` (a tuple of non-negative integers), followed only by whitespace.
pub(super) fn parse_header_dict(text: &str, entry: &'static str) -> Result<NpyHeader, OmniglotError> {
    let bad = |reason: String| {
        let header: String = text.chars().take(200).collect();
        OmniglotError::BadHeader { entry, reason, header }
    };
    let mut p = Parser { s: text.as_bytes(), pos: 0 };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.expect(b'{').map_err(&bad)?;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().map_err(&bad)?;
        p.skip_ws();
        p.expect(b':').map_err(&bad)?;
        p.skip_ws();
        let duplicate = match key.as_str() {
            "descr" => descr.replace(p.string().map_err(&bad)?).is_some(),
            "fortran_order" => fortran_order.replace(p.boolean().map_err(&bad)?).is_some(),
            "shape" => shape.replace(p.tuple().map_err(&bad)?).is_some(),
            other => return Err(bad(format!("unexpected key {other:?}"))),
        };
        if duplicate {
            return Err(bad(format!("duplicate key {key:?}")));
        }
        p.skip_ws();
        if !p.eat(b',') {
            p.skip_ws();
            p.expect(b'}').map_err(&bad)?;
            break;
        }
    }
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(bad(format!("unexpected text after the dictionary at byte {}", p.pos)));
    }
    match (descr, fortran_order, shape) {
        (Some(descr), Some(fortran_order), Some(shape)) => Ok(NpyHeader { entry, descr, fortran_order, shape }),
        _ => Err(bad("expected the keys 'descr', 'fortran_order' and 'shape'".into())),
    }
}

/// A cursor over the bytes of a header dict literal.
pub(super) struct Parser<'a> {
    /// The header text.
    s: &'a [u8],
    /// Current position.
    pos: usize,
}

impl Parser<'_> {
    /// Skips spaces, tabs and newlines.
    fn skip_ws(&mut self) {
        while self.s.get(self.pos).is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// Consumes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consumes `c`, or says what was there instead.
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", char::from(c), self.pos))
        }
    }

    /// A single- or double-quoted string without escapes.
    fn string(&mut self) -> Result<String, String> {
        let quote = match self.s.get(self.pos) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at byte {}", self.pos)),
        };
        let start = self.pos + 1;
        let len = self.s[start..]
            .iter()
            .position(|&b| b == quote)
            .ok_or_else(|| format!("unterminated string at byte {}", self.pos))?;
        let body = &self.s[start..start + len];
        if body.contains(&b'\\') {
            return Err(format!("escape sequences are not supported (string at byte {})", self.pos));
        }
        self.pos = start + len + 1;
        Ok(String::from_utf8_lossy(body).into_owned())
    }

    /// `True` or `False`.
    fn boolean(&mut self) -> Result<bool, String> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.pos..].starts_with(word) {
                self.pos += word.len();
                return Ok(value);
            }
        }
        Err(format!("expected True or False at byte {}", self.pos))
    }

    /// A tuple of non-negative integers: `()`, `(5,)`, `(3, 4)`, `(3, 4,)`.
    fn tuple(&mut self) -> Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(items);
            }
            if items.len() >= 32 {
                return Err("shape has more than 32 dimensions".into());
            }
            items.push(self.integer()?);
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(items);
            }
        }
    }

    /// A non-negative decimal integer that fits in `u64` (Python 2's `L` suffix allowed).
    fn integer(&mut self) -> Result<u64, String> {
        let start = self.pos;
        let mut value: u64 = 0;
        while let Some(&b) = self.s.get(self.pos).filter(|b| b.is_ascii_digit()) {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .ok_or_else(|| format!("integer at byte {start} does not fit in 64 bits"))?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err(format!("expected a non-negative integer at byte {start}"));
        }
        self.eat(b'L');
        Ok(value)
    }
}
