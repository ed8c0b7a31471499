//! The few XDR shapes the control-channel filter reads: words, strings,
//! opaque bytes and libvirt's typed parameter lists. Every length is
//! checked against what is left before anything is allocated.

/// libvirt's bound on typed parameter lists in migration calls
/// (`REMOTE_DOMAIN_MIGRATE_PARAM_LIST_MAX`).
pub const MAX_PARAMS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    #[error("the message ends inside {what}")]
    Truncated { what: &'static str },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{count} typed parameters, more than {MAX_PARAMS}")]
    TooManyParams { count: usize },
    #[error("typed parameter {field} has unknown type {kind}")]
    UnknownType { field: String, kind: i32 },
}

/// A typed parameter's value (`remote_typed_param_value`).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i32),
    UInt(u32),
    LLong(i64),
    ULLong(u64),
    Double(f64),
    Boolean(bool),
    String(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub field: String,
    pub value: ParamValue,
}

pub struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        if self.rest.len() < n {
            return Err(XdrError::Truncated { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, XdrError> {
        self.u32(what).map(|v| v as i32)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, XdrError> {
        let b = self.take(8, what)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Ok(u64::from_be_bytes(w))
    }

    /// Variable-length opaque data, padded to a multiple of 4.
    pub fn opaque(&mut self, what: &'static str) -> Result<&'a [u8], XdrError> {
        let len = self.u32(what)? as usize;
        let padded = len.checked_add(3).ok_or(XdrError::Truncated { what })? & !3;
        if self.rest.len() < padded {
            return Err(XdrError::Truncated { what });
        }
        let bytes = &self.rest[..len];
        self.rest = &self.rest[padded..];
        Ok(bytes)
    }

    pub fn string(&mut self, what: &'static str) -> Result<String, XdrError> {
        let b = self.opaque(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| XdrError::NotUtf8 { what })
    }

    /// A nullable string (`remote_string`): a presence word, then the string.
    pub fn optional_string(&mut self, what: &'static str) -> Result<Option<String>, XdrError> {
        match self.u32(what)? {
            0 => Ok(None),
            _ => self.string(what).map(Some),
        }
    }

    /// A typed parameter list (`remote_typed_param<>`).
    pub fn params(&mut self) -> Result<Vec<Param>, XdrError> {
        let count = self.u32("the parameter count")? as usize;
        if count > MAX_PARAMS {
            return Err(XdrError::TooManyParams { count });
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let field = self.string("a parameter name")?;
            let kind = self.i32("a parameter type")?;
            let value = match kind {
                1 => ParamValue::Int(self.i32("an int parameter")?),
                2 => ParamValue::UInt(self.u32("a uint parameter")?),
                3 => ParamValue::LLong(self.u64("an llong parameter")? as i64),
                4 => ParamValue::ULLong(self.u64("an ullong parameter")?),
                5 => ParamValue::Double(f64::from_bits(self.u64("a double parameter")?)),
                6 => ParamValue::Boolean(self.u32("a boolean parameter")? != 0),
                7 => ParamValue::String(self.string("a string parameter")?),
                kind => return Err(XdrError::UnknownType { field, kind }),
            };
            out.push(Param { field, value });
        }
        Ok(out)
    }
}

/// Writes the same shapes (tests, and the harness that plays a rogue peer).
#[derive(Default)]
pub struct Encoder {
    pub out: Vec<u8>,
}

impl Encoder {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.out.extend_from_slice(b);
        self.out.resize(self.out.len() + (4 - b.len() % 4) % 4, 0);
        self
    }

    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }

    pub fn optional_string(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.u32(0),
            Some(s) => self.u32(1).string(s),
        }
    }

    pub fn params(&mut self, params: &[Param]) -> &mut Self {
        self.u32(params.len() as u32);
        for p in params {
            self.string(&p.field);
            match &p.value {
                ParamValue::Int(v) => self.u32(1).u32(*v as u32),
                ParamValue::UInt(v) => self.u32(2).u32(*v),
                ParamValue::LLong(v) => self.u32(3).u64(*v as u64),
                ParamValue::ULLong(v) => self.u32(4).u64(*v),
                ParamValue::Double(v) => self.u32(5).u64(v.to_bits()),
                ParamValue::Boolean(v) => self.u32(6).u32(u32::from(*v)),
                ParamValue::String(v) => self.u32(7).string(v),
            };
        }
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_strings_and_opaque_round_trip() {
        let params = vec![
            Param {
                field: "destination_xml".into(),
                value: ParamValue::String("<domain/>".into()),
            },
            Param { field: "bandwidth".into(), value: ParamValue::ULLong(7) },
            Param { field: "parallel.connections".into(), value: ParamValue::Int(2) },
        ];
        let mut e = Encoder::default();
        e.params(&params).opaque(b"cookie").u32(3);
        let mut d = Decoder::new(&e.out);
        assert_eq!(d.params().unwrap(), params);
        assert_eq!(d.opaque("cookie").unwrap(), b"cookie");
        assert_eq!(d.u32("flags").unwrap(), 3);
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn lengths_beyond_the_message_and_huge_counts_are_refused() {
        let mut e = Encoder::default();
        e.u32(1_000_000);
        assert_eq!(
            Decoder::new(&e.out).opaque("the cookie"),
            Err(XdrError::Truncated { what: "the cookie" })
        );
        let mut e = Encoder::default();
        e.u32(u32::MAX);
        assert!(Decoder::new(&e.out).opaque("x").is_err(), "no overflow on the padding");
        assert_eq!(
            Decoder::new(&e.out).params(),
            Err(XdrError::TooManyParams { count: u32::MAX as usize })
        );
    }
}
