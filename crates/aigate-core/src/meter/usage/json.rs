//! Byte-level JSON helpers, for bodies and events not worth, or not possible, to parse whole.

use super::*;

/// The byte at `quote` is a `"` not escaped by a backslash.
pub(super) fn unescaped(buf: &[u8], quote: usize) -> bool {
    buf[..quote].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
}

/// If `buf[pos..]` starts with the key `key` (quotes included) used as an object key whose value
/// starts with `open`, the offset of that value.
pub(super) fn key_value_at(buf: &[u8], pos: usize, key: &[u8], open: u8) -> Option<usize> {
    if !unescaped(buf, pos) {
        return None;
    }
    let colon = skip_ws(buf, pos + key.len());
    if buf.get(colon) != Some(&b':') {
        return None;
    }
    let value = skip_ws(buf, colon + 1);
    (buf.get(value) == Some(&open)).then_some(value)
}

/// Whether `buf` has the key `key` with a value starting with `open` (e.g. `"usage": {`). A quoted
/// key followed by a colon can only be a real key in valid JSON (quotes inside strings are escaped).
pub(super) fn has_key_value(buf: &[u8], key: &[u8], open: u8) -> bool {
    memmem::find_iter(buf, key).any(|p| key_value_at(buf, p, key, open).is_some())
}

/// The offset of the value of the last `key` (starting with `open`) whose key lies in `window`.
pub(super) fn last_key_value(buf: &[u8], window: std::ops::Range<usize>, key: &[u8], open: u8) -> Option<usize> {
    let mut end = window.end;
    while let Some(p) = memmem::rfind(&buf[window.start..end], key) {
        let p = window.start + p;
        if let Some(v) = key_value_at(buf, p, key, open) {
            return Some(v);
        }
        end = p;
    }
    None
}

/// The string value of the first `key` whose key lies in `window`.
pub(super) fn first_key_string(buf: &[u8], window: std::ops::Range<usize>, key: &[u8]) -> Option<String> {
    memmem::find_iter(&buf[window.clone()], key)
        .filter_map(|p| key_value_at(buf, window.start + p, key, b'"'))
        .find_map(|v| read_string(buf, v))
}

/// The string value of the last `key` whose key lies in `window`.
pub(super) fn last_key_string(buf: &[u8], window: std::ops::Range<usize>, key: &[u8]) -> Option<String> {
    let v = last_key_value(buf, window, key, b'"')?;
    read_string(buf, v)
}

pub(super) fn read_string(buf: &[u8], quote: usize) -> Option<String> {
    let end = skip_string(buf, quote)?;
    serde_json::from_slice(&buf[quote..end]).ok()
}

/// The JSON object or array starting at `open`, up to its matching close.
pub(super) fn extract_object(buf: &[u8], open: usize) -> Option<&[u8]> {
    let end = skip_value(buf, open)?;
    Some(&buf[open..end])
}

pub(super) fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `buf[i]` is `"`: the offset just past the closing quote.
pub(super) fn skip_string(buf: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = memchr::memchr2(b'"', b'\\', buf.get(j..)?)?;
        j += k;
        if buf[j] == b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// The offset just past the JSON value starting at `i`.
pub(super) fn skip_value(buf: &[u8], i: usize) -> Option<usize> {
    match *buf.get(i)? {
        b'"' => skip_string(buf, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < buf.len() {
                match buf[j] {
                    b'"' => {
                        j = skip_string(buf, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let end = buf[i..].iter().position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'));
            Some(i + end.unwrap_or(buf.len() - i))
        }
    }
}

/// The top-level `model` string of a JSON request body, by a walk over the top-level members (a
/// repeated key: the last one). `None` if the body is not a JSON object with a string `model`.
pub fn request_model(body: &[u8]) -> Option<String> {
    let span = find_member(body, b"model")?.value?;
    if body[span.start] != b'"' {
        return None;
    }
    serde_json::from_slice(&body[span]).ok()
}

/// The raw JSON value of the top-level member `key` of the object `buf` (a repeated key: the last
/// one), without allocating. `None` if `buf` is not an object or has no such member.
pub fn member_value<'a>(buf: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let span = find_member(buf, key.as_bytes())?.value?;
    buf.get(span)
}

/// Calls `f(raw key, raw value)` for each top-level member of the JSON object `buf`, in order (the
/// key with its quotes); false if `buf` is not an object.
pub fn for_each_member<'a>(buf: &'a [u8], mut f: impl FnMut(&'a [u8], &'a [u8])) -> bool {
    walk_members(buf, |k, v| {
        f(&buf[k], &buf[v]);
        true
    })
    .is_some()
}

/// Whether the raw JSON value `raw` is the string `expected`, or a number or literal written as
/// `expected` (`3`, `true`): metadata compares that way everywhere. Allocates only for a string
/// with escapes.
pub fn value_is(raw: &[u8], expected: &str) -> bool {
    match raw {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => inner == expected.as_bytes(),
        [b'"', ..] => serde_json::from_slice::<String>(raw).is_ok_and(|s| s == expected),
        _ => raw == expected.as_bytes(),
    }
}

/// A member of the top-level object of `buf`.
pub(super) struct Member {
    /// The span of the value of the key looked for, if present.
    pub(super) value: Option<std::ops::Range<usize>>,
    /// The offset of the object's closing `}`.
    pub(super) close: usize,
}

/// Walks the members of the JSON object `buf` (already known to be valid JSON) looking for `key`.
pub(super) fn find_member(buf: &[u8], key: &[u8]) -> Option<Member> {
    let mut found = None;
    let close = walk_members(buf, |k, value| {
        let raw = &buf[k.start + 1..k.end - 1];
        let is_key = if raw.contains(&b'\\') {
            match serde_json::from_slice::<String>(&buf[k]) {
                Ok(decoded) => decoded.as_bytes() == key,
                Err(_) => return false,
            }
        } else {
            raw == key
        };
        if is_key {
            found = Some(value);
        }
        true
    })?;
    Some(Member { value: found, close })
}

/// Calls `f(key, value)` for each member of the top-level object of `buf`, with the spans of the
/// quoted key and of the value, in order; returns the offset of the object's closing `}`. `None`
/// if `buf` does not start with an object of that shape, or when `f` returns false.
pub(super) fn walk_members(
    buf: &[u8],
    mut f: impl FnMut(std::ops::Range<usize>, std::ops::Range<usize>) -> bool,
) -> Option<usize> {
    let mut i = skip_ws(buf, 0);
    if buf.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(buf, i);
        match buf.get(i)? {
            b'}' => return Some(i),
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(buf, i)?;
        let key = i..key_end;
        i = skip_ws(buf, key_end);
        if buf.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(buf, i + 1);
        let value_end = skip_value(buf, i)?;
        if !f(key, i..value_end) {
            return None;
        }
        i = skip_ws(buf, value_end);
        match buf.get(i)? {
            b',' => i += 1,
            b'}' => return Some(i),
            _ => return None,
        }
    }
}
