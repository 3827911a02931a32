//! What the fuzz targets share: the layout of their binary inputs and the
//! oracles they check Warren's answers against.
//!
//! A binary input is read by [`Fields`]: fixed-size numbers, then fields of
//! a 2-byte big-endian length and that many bytes, then whatever remains.
//! Reading past the end gives zeros and empty fields, so every input means
//! something. [`FieldWriter`] writes the same layout (the seed generator,
//! `examples/seeds.rs`, uses it).

use amq_protocol_types::{AMQPValue, FieldTable};

/// Reads a fuzz input field by field.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    /// Starts at the beginning of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// One byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A big-endian `u32` (missing bytes are zeros).
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_be_bytes(b)
    }

    /// A big-endian `u64` (missing bytes are zeros).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.take(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_be_bytes(b)
    }

    /// A field: a 2-byte big-endian length, then that many bytes (fewer at
    /// the end of the input).
    pub fn field(&mut self) -> &'a [u8] {
        let len = self.take(2);
        let len = match len {
            [a, b] => usize::from(u16::from_be_bytes([*a, *b])),
            [a] => usize::from(*a),
            _ => 0,
        };
        self.take(len)
    }

    /// A field read as text, invalid UTF-8 replaced (AMQP short strings
    /// reach Warren as Rust strings).
    pub fn text(&mut self) -> String {
        String::from_utf8_lossy(self.field()).into_owned()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Writes an input in the layout [`Fields`] reads.
#[derive(Default)]
pub struct FieldWriter {
    out: Vec<u8>,
}

impl FieldWriter {
    /// An empty input.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one byte.
    pub fn byte(mut self, b: u8) -> Self {
        self.out.push(b);
        self
    }

    /// Appends a big-endian `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a length-prefixed field (at most 65,535 bytes).
    pub fn field(mut self, bytes: &[u8]) -> Self {
        let len = u16::try_from(bytes.len()).expect("a field is at most 65,535 bytes");
        self.out.extend_from_slice(&len.to_be_bytes());
        self.out.extend_from_slice(bytes);
        self
    }

    /// Appends the unprefixed rest and returns the input.
    pub fn finish(mut self, rest: &[u8]) -> Vec<u8> {
        self.out.extend_from_slice(rest);
        self.out
    }
}

/// Decodes a header table as the broker client does (its 4-byte length
/// first); `None` for bytes the client would refuse.
pub fn decode_table(bytes: &[u8]) -> Option<FieldTable> {
    amq_protocol_types::parsing::parse_field_table(bytes)
        .ok()
        .map(|(_, t)| t)
}

/// Encodes a header table as the broker client sends it.
pub fn encode_table(t: &FieldTable) -> Vec<u8> {
    cookie_factory::gen_simple(
        amq_protocol_types::generation::gen_field_table(t),
        Vec::new(),
    )
    .expect("a header table encodes")
}

/// Nesting depth of a table, counted the obvious recursive way (1 for a flat
/// table, one more per nested table or array): the oracle for
/// `warren_core::headers::shape`, which counts without recursion.
pub fn depth(t: &FieldTable) -> usize {
    fn value_depth(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::FieldTable(t) => depth(t),
            AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + t.inner().values().map(value_depth).max().unwrap_or(0)
}
