//! Requests read on one connection and not answered yet, in order, with
//! the bytes their targets hold: a client chooses both how many it
//! pipelines and how long each target is.

use std::collections::VecDeque;

/// Most pipelined requests waiting for responses on one connection.
pub(super) const MAX_PENDING_REQUESTS: usize = 256;

/// One request waiting for its response.
#[derive(Debug)]
pub(super) struct PendingRequest {
    pub method: http::Method,
    pub target: String,
    pub version: http::Version,
    pub started_ns: u64,
    pub bytes: u64,
    /// Its body's payload bytes so far, when its head was read whole and
    /// its framing kept.
    pub body_bytes: Option<u64>,
    /// Framing the server must refuse: its answer makes no exchange.
    pub refused: bool,
}

/// The queue, and the bytes of the targets it holds.
#[derive(Debug, Default)]
pub(super) struct PendingRequests {
    requests: VecDeque<PendingRequest>,
    target_bytes: usize,
}

impl PendingRequests {
    /// Adds a request; the oldest make room past [`MAX_PENDING_REQUESTS`].
    /// Returns the requests that made room.
    pub(super) fn push(&mut self, request: PendingRequest) -> Vec<PendingRequest> {
        let mut dropped = Vec::new();
        while self.requests.len() >= MAX_PENDING_REQUESTS {
            dropped.extend(self.pop_front());
        }
        self.target_bytes += request.target.len();
        self.requests.push_back(request);
        dropped
    }

    pub(super) fn pop_front(&mut self) -> Option<PendingRequest> {
        let request = self.requests.pop_front()?;
        self.target_bytes -= request.target.len();
        Some(request)
    }

    pub(super) fn front(&self) -> Option<&PendingRequest> {
        self.requests.front()
    }

    pub(super) fn back_mut(&mut self) -> Option<&mut PendingRequest> {
        self.requests.back_mut()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &PendingRequest> {
        self.requests.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.requests.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Gives up the oldest request still holding target bytes: it stays
    /// in place, empty and refused, so its response still pairs with it
    /// (and makes no exchange) and later ones pair with their own. Whether
    /// it was one to count as lost (not refused already); `None` when none
    /// holds bytes.
    pub(super) fn hollow_oldest(&mut self) -> Option<bool> {
        let request = self
            .requests
            .iter_mut()
            .find(|request| !request.target.is_empty())?;
        let counted = !request.refused;
        self.target_bytes -= request.target.len();
        request.target = String::new();
        request.refused = true;
        Some(counted)
    }

    /// Bytes of the targets held.
    pub(super) fn target_bytes(&self) -> usize {
        self.target_bytes
    }

    pub(super) fn clear(&mut self) {
        self.requests.clear();
        self.target_bytes = 0;
    }

    /// Empty, keeping the buffer when it is small (so that a recycled
    /// connection allocates nothing).
    pub(super) fn recycled(mut self, kept: usize) -> Self {
        self.clear();
        if self.requests.capacity() > kept {
            self.requests = VecDeque::new();
        }
        self
    }
}
