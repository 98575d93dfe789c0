//! Small readers of wasm binaries and symbol names, for clear refusals and
//! error records. Untrusted input: every read is bounds-checked and a module
//! that cannot be read here is left to wasmtime to judge.

/// The largest initial size, in bytes, of a linear memory the module defines
/// in its memory section; `None` if it defines none or the section cannot be read.
pub(crate) fn initial_memory_bytes(bytes: &[u8]) -> Option<u64> {
    let mut r = Reader { bytes, pos: 8 };
    while r.pos < bytes.len() {
        let id = r.byte()?;
        let size = usize::try_from(r.leb()?).ok()?;
        let end = r.pos.checked_add(size).filter(|end| *end <= bytes.len())?;
        if id == 5 {
            let mut s = Reader { bytes: &bytes[..end], pos: r.pos };
            let mut largest = None;
            for _ in 0..s.leb()? {
                let flags = s.byte()?;
                let min = s.leb()?;
                if flags & 0x01 != 0 {
                    s.leb()?; // maximum
                }
                // The custom-page-sizes proposal gives log2 of the page size.
                let page_log2 = if flags & 0x08 != 0 { s.leb()? } else { 16 };
                let size = if page_log2 >= 64 { u64::MAX } else { min.saturating_mul(1u64 << page_log2) };
                largest = largest.max(Some(size));
            }
            return largest;
        }
        r.pos = end;
    }
    None
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// An unsigned LEB128 of at most 64 bits.
    fn leb(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// A Rust (legacy-mangled) symbol as a path without its hash:
/// `_ZN6bigout4main17h7f44fd3a51112c2dE` -> `bigout::main`. Anything else
/// is returned as it is.
pub(crate) fn demangle(name: &str) -> String {
    demangle_legacy(name).unwrap_or_else(|| name.to_owned())
}

fn demangle_legacy(name: &str) -> Option<String> {
    let mut rest = name.strip_prefix("_ZN")?.strip_suffix('E')?;
    let mut parts: Vec<String> = Vec::new();
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let len: usize = rest[..digits].parse().ok()?;
        let start = digits;
        let end = start.checked_add(len).filter(|e| *e <= rest.len())?;
        parts.push(unescape(rest.get(start..end)?));
        rest = &rest[end..];
    }
    // The last part is the hash `h` + 16 hex digits.
    if parts
        .last()
        .is_some_and(|h| h.len() == 17 && h.starts_with('h') && h[1..].bytes().all(|b| b.is_ascii_hexdigit()))
    {
        parts.pop();
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("::"))
}

fn unescape(part: &str) -> String {
    let part = part.strip_prefix("_$").map(|p| format!("${p}")).unwrap_or_else(|| part.to_owned());
    let mut out = part;
    for (from, to) in [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$C$", ","),
        ("$SP$", "@"),
        ("$u20$", " "),
        ("$u27$", "'"),
        ("$u5b$", "["),
        ("$u5d$", "]"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$u7e$", "~"),
        ("..", "::"),
    ] {
        out = out.replace(from, to);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(sections: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = b"\0asm\x01\0\0\0".to_vec();
        for (id, body) in sections {
            out.push(*id);
            out.push(body.len() as u8);
            out.extend_from_slice(body);
        }
        out
    }

    #[test]
    fn reads_the_initial_memory() {
        assert_eq!(initial_memory_bytes(&module(&[(1, &[1, 0x60, 0, 0]), (5, &[1, 0, 2])])), Some(2 << 16));
        // 16384 pages with a maximum.
        assert_eq!(initial_memory_bytes(&module(&[(5, &[1, 1, 0x80, 0x80, 0x01, 0x80, 0x80, 0x01])])), Some(1 << 30));
        assert_eq!(initial_memory_bytes(&module(&[(1, &[1, 0x60, 0, 0])])), None);
        // Truncated or malformed: left to wasmtime.
        assert_eq!(initial_memory_bytes(&module(&[(5, &[1, 0])])), None);
        assert_eq!(initial_memory_bytes(b"\0asm\x01\0\0\0\x05\xff"), None);
        assert_eq!(initial_memory_bytes(b"\0asm"), None);
    }

    #[test]
    fn demangles_rust_symbols() {
        assert_eq!(demangle("_ZN6bigout4main17h7f44fd3a51112c2dE"), "bigout::main");
        assert_eq!(demangle("_ZN4core9panicking5panic17h0123456789abcdefE"), "core::panicking::panic");
        assert_eq!(
            demangle("_ZN60_$LT$std..io..error..Error$u20$as$u20$core..fmt..Display$GT$3fmt17h0123456789abcdefE"),
            "<std::io::error::Error as core::fmt::Display>::fmt"
        );
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("_ZN99tooshortE"), "_ZN99tooshortE");
    }
}
