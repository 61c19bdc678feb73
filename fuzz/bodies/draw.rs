//! Values drawn from fuzz input bytes: the same bytes always give the same values, and every
//! byte string gives something (zeros once the input runs out), so libFuzzer's mutations and
//! proptest's byte vectors both steer the shapes a body tries.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use serde_json::{Map, Number, Value};

/// Numbers at the edges of every representation a decoder or a comparison may take: the f64
/// precision limit, the i64 and u64 ends, floats with and without a fraction.
const NUMBERS: &[f64] = &[0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 1e15, 1e16, 1e300, -1e300, 5e-324, 9007199254740992.0, 9007199254740993.0];
const INTEGERS: &[i64] = &[0, 1, -1, 7, 255, 256, 65536, 9_007_199_254_740_992, 9_007_199_254_740_993, i64::MAX, i64::MIN];
const UNSIGNED: &[u64] = &[u64::MAX, u64::MAX - 1, i64::MAX as u64 + 1];
const WORDS: &[&str] = &["", "a", "b", "s1", "store-7", "é", "\u{0}", "a\u{0}b", "2024-11-15", "Ω≈ç√", "\u{10FFFF}", "1", "1.0", "null", "type"];

/// A reader of fuzz input bytes.
pub struct Draw<'a> {
    bytes: &'a [u8],
}

impl<'a> Draw<'a> {
    pub fn new(bytes: &'a [u8]) -> Draw<'a> {
        Draw { bytes }
    }

    pub fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((first, rest)) => {
                self.bytes = rest;
                *first
            }
            None => 0,
        }
    }

    /// A number in `0..n` (`n` at least 1).
    pub fn below(&mut self, n: usize) -> usize {
        let wide = u16::from_le_bytes([self.byte(), self.byte()]) as usize;
        wide % n.max(1)
    }

    pub fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        word.iter_mut().for_each(|b| *b = self.byte());
        u64::from_le_bytes(word)
    }

    pub fn pick<'p, T>(&mut self, from: &'p [T]) -> &'p T {
        &from[self.below(from.len())]
    }

    /// The bytes not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }

    pub fn word(&mut self) -> String {
        match self.below(4) {
            0 => {
                let len = self.below(12);
                (0..len).filter_map(|_| char::from_u32(self.u64() as u32 % 0x11_0000)).collect()
            }
            _ => self.pick(WORDS).to_string(),
        }
    }

    pub fn number(&mut self) -> Number {
        match self.below(6) {
            0 => Number::from_f64(*self.pick(NUMBERS)).unwrap_or_else(|| Number::from(0)),
            1 => Number::from(*self.pick(INTEGERS)),
            2 => Number::from(*self.pick(UNSIGNED)),
            3 => Number::from_f64(f64::from_bits(self.u64())).unwrap_or_else(|| Number::from(0)),
            4 => Number::from(self.u64() as i64),
            _ => Number::from(self.below(20) as i64 - 10),
        }
    }

    /// Any JSON value, nested at most `depth` deep.
    pub fn value(&mut self, depth: u32) -> Value {
        let kinds = if depth == 0 { 4 } else { 6 };
        match self.below(kinds) {
            0 => Value::Null,
            1 => Value::Bool(self.byte() & 1 == 1),
            2 => Value::Number(self.number()),
            3 => Value::String(self.word()),
            4 => Value::Array((0..self.below(4)).map(|_| self.value(depth - 1)).collect()),
            _ => Value::Object(self.object(depth - 1, &[])),
        }
    }

    /// An object of up to three entries whose keys are drawn from `keys` (or any words when
    /// `keys` is empty).
    pub fn object(&mut self, depth: u32, keys: &[&str]) -> Map<String, Value> {
        let mut object = Map::new();
        for _ in 0..self.below(4) {
            let key = if keys.is_empty() { self.word() } else { self.pick(keys).to_string() };
            object.insert(key, self.value(depth));
        }
        object
    }
}
