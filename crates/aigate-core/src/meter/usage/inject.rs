//! Asking a streaming OpenAI-style request for its usage (`stream_options.include_usage`) and
//! hiding the extra event this adds from the client ([`InjectedUsageFilter`]).

use super::*;

/// For an OpenAI-style streaming request body (`"stream": true`, chat/completions or completions)
/// that does not set `stream_options.include_usage`, returns the body with
/// `"stream_options":{"include_usage":true}` added (or `"include_usage":true` added to an existing
/// `stream_options` object). Every other byte of the body is kept as it was (no reformatting, no
/// key reordering). `None` means "send the body unchanged": not a JSON object, not streaming,
/// `include_usage` already present (true or false: an explicit choice is respected), or a
/// `stream_options` that is not an object.
///
/// With it, the upstream sends one more event, a chunk with `"choices":[]` and the usage, which
/// [`InjectedUsageFilter`] removes; it also adds `"usage":null` to every other chunk, which the
/// filter leaves (the OpenAI SDKs treat the field as optional). Only send this to providers that
/// accept `stream_options` (OpenAI, Azure OpenAI, DeepSeek, xAI, …). Update `Content-Length`.
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: Option<bool>,
        // Declared so that a duplicated key is an error rather than ambiguous.
        #[serde(default)]
        #[allow(dead_code)]
        stream_options: Option<IgnoredAny>,
    }
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    const OBJECT: &[u8] = br#"{"include_usage":true}"#;
    const FIELD: &[u8] = br#""include_usage":true"#;

    let probe: Probe = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(true) {
        return None;
    }
    let top = find_member(body, b"stream_options")?;
    let splice = |at: std::ops::Range<usize>, insert: &[&[u8]]| {
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(&body[..at.start]);
        for part in insert {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&body[at.end..]);
        out
    };
    let Some(value) = top.value else {
        // `stream` is a member, so the object is not empty: append after the last member.
        return Some(splice(top.close..top.close, &[b",", MEMBER]));
    };
    match body[value.start] {
        b'n' => Some(splice(value, &[OBJECT])),
        b'{' => {
            let inner = find_member(&body[value.clone()], b"include_usage")?;
            if inner.value.is_some() {
                None
            } else if skip_ws(body, value.start + 1) == value.start + inner.close {
                Some(splice(value, &[OBJECT]))
            } else {
                Some(splice(value.start + 1..value.start + 1, &[FIELD, b","]))
            }
        }
        _ => None,
    }
}

/// A stateful filter over the SSE chunks of a stream whose request went through
/// [`inject_include_usage`]: it drops exactly the events whose data is a JSON object with
/// `"choices":[]` and a non-null `usage` object, and passes every other byte through unchanged,
/// in order (`data: [DONE]` included). Use it only when aigate injected `include_usage`; a client
/// that asked for usage itself must get the event.
///
/// Latency: complete events are passed on in the call that completes them; only the unfinished
/// tail of a chunk (an event the client could not dispatch yet anyway) is held back, at most
/// [`MAX_EVENT_BYTES`] (a longer event cannot be the small usage event and is passed through).
/// In the common case of chunks ending on event boundaries the chunk is returned as is, without
/// copying.
#[derive(Debug, Default)]
pub struct InjectedUsageFilter {
    scan: EventScan,
    /// The unfinished event at the end of the last chunk.
    pending: Vec<u8>,
    /// Passing the rest of an over-long event through.
    passthrough: bool,
    /// The last complete event was dropped (a LF completing its CR must be dropped too).
    last_dropped: bool,
    usage: Option<Usage>,
}

impl InjectedUsageFilter {
    /// A filter for one stream.
    pub fn new() -> InjectedUsageFilter {
        InjectedUsageFilter::default()
    }

    /// Filters the next chunk; returns what to send to the client (possibly empty).
    pub fn strip_injected_usage_event(&mut self, chunk: Bytes) -> Bytes {
        let mut out = Out::Empty;
        let mut i = 0;
        if self.scan.after_cr {
            self.scan.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
                if !self.pending.is_empty() {
                    self.pending.push(b'\n');
                } else if self.passthrough || !self.last_dropped {
                    out.range(&chunk, 0, 1);
                }
            }
        }
        if self.passthrough {
            match self.scan.next_end(&chunk, i) {
                Some(end) => {
                    out.range(&chunk, i, end);
                    i = end;
                    self.passthrough = false;
                    self.last_dropped = false;
                }
                None => {
                    out.range(&chunk, i, chunk.len());
                    return out.build(chunk);
                }
            }
        }
        while i < chunk.len() {
            let start = i;
            match self.scan.next_end(&chunk, i) {
                Some(end) => {
                    i = end;
                    if self.pending.is_empty() {
                        self.last_dropped = self.is_injected(&chunk[start..end]);
                        if !self.last_dropped {
                            out.range(&chunk, start, end);
                        }
                    } else {
                        self.pending.extend_from_slice(&chunk[start..end]);
                        let event = std::mem::take(&mut self.pending);
                        self.last_dropped = self.is_injected(&event);
                        if !self.last_dropped {
                            out.owned(&chunk, event);
                        }
                    }
                }
                None => {
                    self.pending.extend_from_slice(&chunk[start..]);
                    if self.pending.len() > MAX_EVENT_BYTES {
                        out.owned(&chunk, std::mem::take(&mut self.pending));
                        self.passthrough = true;
                    }
                    break;
                }
            }
        }
        out.build(chunk)
    }

    /// The end of the stream: returns the held-back unfinished last event, if any (dropped if it
    /// is the usage event).
    pub fn finish(&mut self) -> Bytes {
        let event = std::mem::take(&mut self.pending);
        if event.is_empty() || self.is_injected(&event) {
            Bytes::new()
        } else {
            Bytes::from(event)
        }
    }

    /// The usage read from the dropped event, if one was dropped.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    fn is_injected(&mut self, event: &[u8]) -> bool {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Probe {
            choices: Loose,
            usage: Obj<RawUsage>,
            model: Text,
        }
        if !has_key_value(event, USAGE_KEY, b'{') || memmem::find(event, b"\"choices\"").is_none() {
            return false;
        }
        let Some(data) = event_data(event) else { return false };
        let Ok(probe) = serde_json::from_slice::<Probe>(&data) else { return false };
        let (Loose::SeqLen(0), Some(raw)) = (probe.choices, probe.usage.0) else { return false };
        self.usage = raw.normalise(Shape::OpenAi, probe.model.0);
        true
    }
}

/// Output of one filter call: nothing, one range of the input chunk (no copy), or owned bytes.
pub(super) enum Out {
    Empty,
    Range(usize, usize),
    Buf(Vec<u8>),
}

impl Out {
    fn range(&mut self, chunk: &[u8], s: usize, e: usize) {
        match self {
            Out::Empty => *self = Out::Range(s, e),
            Out::Range(_, b) if *b == s => *b = e,
            Out::Range(a, b) => {
                let mut v = chunk[*a..*b].to_vec();
                v.extend_from_slice(&chunk[s..e]);
                *self = Out::Buf(v);
            }
            Out::Buf(v) => v.extend_from_slice(&chunk[s..e]),
        }
    }

    fn owned(&mut self, chunk: &[u8], bytes: Vec<u8>) {
        match self {
            Out::Empty => *self = Out::Buf(bytes),
            Out::Range(a, b) => {
                let mut v = chunk[*a..*b].to_vec();
                v.extend_from_slice(&bytes);
                *self = Out::Buf(v);
            }
            Out::Buf(v) => v.extend_from_slice(&bytes),
        }
    }

    fn build(self, chunk: Bytes) -> Bytes {
        match self {
            Out::Empty => Bytes::new(),
            Out::Range(0, e) if e == chunk.len() => chunk,
            Out::Range(s, e) => chunk.slice(s..e),
            Out::Buf(v) => Bytes::from(v),
        }
    }
}

/// Finds event ends (the end of a blank line) across chunks.
#[derive(Debug, Clone, Copy)]
pub(super) struct EventScan {
    at_line_start: bool,
    /// The previous chunk ended with a CR ending a line; a LF starting the next belongs to it.
    after_cr: bool,
}

impl Default for EventScan {
    fn default() -> Self {
        EventScan { at_line_start: true, after_cr: false }
    }
}

impl EventScan {
    /// The offset just past the blank line ending the current event, scanning from `i`.
    fn next_end(&mut self, buf: &[u8], mut i: usize) -> Option<usize> {
        while i < buf.len() {
            let Some(k) = memchr2(b'\n', b'\r', &buf[i..]) else {
                self.at_line_start = false;
                return None;
            };
            let blank = k == 0 && self.at_line_start;
            let pos = i + k;
            i = pos + 1;
            if buf[pos] == b'\r' {
                match buf.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.at_line_start = true;
            if blank {
                return Some(i);
            }
        }
        None
    }
}

/// The `data` of one complete SSE event (its lines joined with `\n`); `None` if it has none.
pub(super) fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = event;
    while !rest.is_empty() {
        let end = memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        let value = match line.strip_prefix(b"data") {
            Some([]) => Some(&[][..]),
            Some([b':', v @ ..]) => Some(v.strip_prefix(b" ").unwrap_or(v)),
            _ => None,
        };
        if let Some(v) = value {
            match &mut data {
                None => data = Some(Cow::Borrowed(v)),
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
            }
        }
        let mut next = (end + 1).min(rest.len());
        if rest.get(end) == Some(&b'\r') && rest.get(end + 1) == Some(&b'\n') {
            next += 1;
        }
        rest = &rest[next..];
    }
    data
}
