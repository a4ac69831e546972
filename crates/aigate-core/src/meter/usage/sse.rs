//! Usage of a streamed answer, read event by event as it is relayed ([`SseUsage`]).

use super::*;

/// Where the SSE parser is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Line {
    /// In the field name; the count of bytes matched so far of `data` (0 = at line start).
    Name(u8),
    /// In the value of a `data` field; `first` while its optional leading space may still come.
    Data { first: bool },
    /// In a line that does not matter (another field, a comment).
    Skip,
}

/// Reads usage from an SSE response body fed chunk by chunk as it is relayed.
///
/// ```ignore
/// let mut acc = SseUsage::new(Endpoint::ChatCompletions);
/// for chunk in body { acc.feed(&chunk); /* relay chunk */ }
/// let usage = acc.finish();
/// ```
#[derive(Debug)]
pub struct SseUsage {
    shape: Shape,
    line: Line,
    /// The last byte seen was a CR ending a line; a following LF belongs to it.
    after_cr: bool,
    /// `data` of the current event (lines joined with `\n`), bounded by [`MAX_EVENT_BYTES`].
    data: Vec<u8>,
    /// `data` lines seen in the current event.
    data_lines: u32,
    /// `data` lost its beginning (the event was larger than the bound).
    truncated: bool,
    acc: Acc,
}

impl SseUsage {
    /// A reader for a stream from `endpoint` (one whose answer carries usage).
    pub fn new(endpoint: Endpoint) -> SseUsage {
        SseUsage {
            shape: endpoint.usage_format().unwrap_or(UsageFormat::OpenAi),
            line: Line::Name(0),
            after_cr: false,
            data: Vec::new(),
            data_lines: 0,
            truncated: false,
            acc: Acc::default(),
        }
    }

    /// Feeds the next chunk of the body, in order. Events may span chunks anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Name(k) => {
                    let b = chunk[i];
                    i += 1;
                    match b {
                        b'\n' | b'\r' => self.end_line(b),
                        b':' if k == 4 => {
                            self.start_data_line();
                            self.line = Line::Data { first: true };
                        }
                        _ if usize::from(k) < 4 && b == b"data"[usize::from(k)] => self.line = Line::Name(k + 1),
                        _ => self.line = Line::Skip,
                    }
                }
                Line::Data { first } => {
                    if first && chunk[i] == b' ' {
                        i += 1;
                        self.line = Line::Data { first: false };
                        continue;
                    }
                    let rest = &chunk[i..];
                    let end = memchr2(b'\n', b'\r', rest);
                    self.push_data(&rest[..end.unwrap_or(rest.len())]);
                    self.line = Line::Data { first: false };
                    match end {
                        Some(e) => {
                            i += e + 1;
                            self.end_line(rest[e]);
                        }
                        None => i = chunk.len(),
                    }
                }
                Line::Skip => {
                    let rest = &chunk[i..];
                    match memchr2(b'\n', b'\r', rest) {
                        Some(e) => {
                            i += e + 1;
                            self.end_line(rest[e]);
                        }
                        None => i = chunk.len(),
                    }
                }
            }
        }
    }

    /// The model named by the stream so far (the first event naming one, then any usage event).
    pub fn model(&self) -> Option<&str> {
        self.acc.model.as_deref()
    }

    /// The usage seen so far, without ending the stream.
    pub fn usage(&self) -> Option<Usage> {
        self.acc.usage(self.shape)
    }

    /// Ends the stream (an unterminated last event is still read) and gives its usage.
    pub fn finish(mut self) -> Option<Usage> {
        self.dispatch();
        self.acc.usage(self.shape)
    }

    /// Bytes currently buffered (for tests of the bound).
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.data.capacity()
    }

    fn end_line(&mut self, terminator: u8) {
        self.after_cr = terminator == b'\r';
        match self.line {
            Line::Name(0) => self.dispatch(),
            // A line that is exactly `data`: a data field with an empty value.
            Line::Name(4) => self.start_data_line(),
            _ => {}
        }
        self.line = Line::Name(0);
    }

    fn start_data_line(&mut self) {
        if self.data_lines > 0 {
            self.push_data(b"\n");
        }
        self.data_lines = self.data_lines.saturating_add(1);
    }

    fn push_data(&mut self, bytes: &[u8]) {
        if self.data.len() + bytes.len() <= MAX_EVENT_BYTES {
            self.data.extend_from_slice(bytes);
            return;
        }
        if !self.truncated {
            self.truncated = true;
            // The model is named near the start of an event; take it before the start is dropped.
            if self.acc.model.is_none() {
                let head = 0..self.data.len();
                self.acc.model = first_key_string(&self.data, head, self.shape.model_key());
            }
        }
        if bytes.len() >= TAIL_BYTES {
            self.data.clear();
            self.data.extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
        } else {
            let drop = (self.data.len() + bytes.len()).saturating_sub(TAIL_BYTES);
            self.data.drain(..drop.min(self.data.len()));
            self.data.extend_from_slice(bytes);
        }
    }

    /// The current event is complete: read it if it can matter, then reset.
    fn dispatch(&mut self) {
        if self.data_lines > 0 && !self.data.is_empty() {
            if self.truncated {
                self.read_truncated();
            } else {
                self.read_event();
            }
        }
        self.data.clear();
        self.data_lines = 0;
        self.truncated = false;
        if self.data.capacity() > KEEP_CAPACITY {
            self.data = Vec::new();
        }
    }

    fn read_event(&mut self) {
        let data = &self.data;
        let has_usage = has_key_value(data, self.shape.usage_key(), b'{');
        let wants_model = self.acc.model.is_none() && memmem::find(data, b"\"model").is_some();
        if !has_usage && !wants_model {
            return;
        }
        match serde_json::from_slice::<Envelope>(data) {
            Ok(env) => self.acc.absorb(self.shape, env),
            Err(e) => tracing::trace!(error = %e, "skipping an SSE event that is not JSON"),
        }
    }

    /// Reads the usage object (and model) from the kept tail of an over-long event.
    fn read_truncated(&mut self) {
        let data = &self.data;
        let all = 0..data.len();
        if let Some(open) = last_key_value(data, all.clone(), self.shape.usage_key(), b'{') {
            if let Some(raw) = extract_object(data, open).and_then(|o| serde_json::from_slice::<RawUsage>(o).ok()) {
                self.acc.merge(raw);
            }
        }
        if self.acc.model.is_none() {
            self.acc.model = last_key_string(data, all, self.shape.model_key());
        }
    }
}
