//! Little-endian writer and bounds-checked reader for the state blob. The
//! reader never panics: every read checks the remaining length and returns
//! [`StateError::Truncated`].

use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::StateError;

/// Appends little-endian values to a buffer.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A length-prefixed (u32) byte string.
    pub(crate) fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.bytes(b);
    }
    /// A kernel ABI struct, as its bytes (x86_64: little-endian, no
    /// implicit padding: zerocopy checks that at compile time).
    pub(crate) fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

/// Reads little-endian values from a slice, checking every length.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.buf.len() {
            return Err(StateError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.malformed(format!("boolean byte {v}"))),
        }
    }
    pub(crate) fn u16(&mut self) -> Result<u16, StateError> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, StateError> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, StateError> {
        self.array().map(u64::from_le_bytes)
    }
    pub(crate) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        self.array()
    }
    /// A length-prefixed byte string of at most `max` bytes.
    pub(crate) fn blob(&mut self, max: usize) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.malformed(format!("length {n} exceeds {max}")));
        }
        self.take(n)
    }
    /// A count of at most `max` items.
    pub(crate) fn count(&mut self, max: usize) -> Result<usize, StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.malformed(format!("count {n} exceeds {max}")));
        }
        Ok(n)
    }
    pub(crate) fn pod<T: FromBytes>(&mut self) -> Result<T, StateError> {
        let b = self.take(std::mem::size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| StateError::Truncated(self.what))
    }
    pub(crate) fn malformed(&self, what: String) -> StateError {
        StateError::Malformed {
            section: self.what,
            what,
        }
    }
    /// Fails unless everything was read.
    pub(crate) fn finish(self) -> Result<(), StateError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} trailing bytes", self.buf.len())))
        }
    }
}
