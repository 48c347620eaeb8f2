//! Streams over MQTT: DescribeStream and GetStream (blocks of a stream file) in CBOR or
//! JSON, with the documented `rejected` codes.

use bytes::Bytes;
use updraft_protocol::streams::{
    BlockResponse, DescribeStreamRequest, DescribeStreamResponse, GetStreamRequest, RejectCode,
    StreamError, StreamFile as WireFile, block_range, select_blocks,
};
use updraft_protocol::topics::{Format, StreamOp};

use super::reply;
use crate::mqtt::{Inbound, MessageBus};
use crate::server::AppState;
use crate::store::Stream;
use std::sync::Arc;

fn topic(thing: &str, stream_id: &str, kind: &str, format: Format) -> String {
    format!(
        "$aws/things/{thing}/streams/{stream_id}/{kind}/{}",
        format.as_str()
    )
}

pub(super) async fn handle(
    state: &AppState,
    bus: &dyn MessageBus,
    msg: &Inbound,
    stream_id: &str,
    op: StreamOp,
    format: Format,
) {
    let thing = msg.client_id.as_str();
    let result = match op {
        StreamOp::Describe => describe(state, bus, thing, stream_id, format, &msg.payload).await,
        _ => get(state, bus, thing, stream_id, format, &msg.payload).await,
    };
    if let Err(e) = result {
        reply(
            bus,
            thing,
            topic(thing, stream_id, "rejected", format),
            e.encode(format),
        );
    }
}

/// Answers a stream request whose stream id is malformed with `InvalidTopic` (other
/// malformed stream topics — an unknown operation or format — say nowhere to answer).
pub(super) fn invalid_topic(bus: &dyn MessageBus, msg: &Inbound) {
    use updraft_protocol::topics::{DeviceTopic, malformed_stream_request};
    let Some((rejected, reason)) = malformed_stream_request(&msg.topic) else {
        return;
    };
    let DeviceTopic::Stream { format, .. } = rejected else {
        return;
    };
    // Only the thing itself may ask (as for every request).
    if rejected.thing() != msg.client_id {
        return;
    }
    let e = StreamError::new(RejectCode::InvalidTopic, reason.to_string());
    reply(bus, &msg.client_id, rejected.to_string(), e.encode(format));
}

async fn load_stream(state: &AppState, stream_id: &str) -> Result<Arc<Stream>, StreamError> {
    match state.data_plane.stream(state, stream_id).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(StreamError::new(
            RejectCode::ResourceNotFound,
            format!("Stream {stream_id} does not exist"),
        )),
        Err(e) => {
            tracing::error!(error = %e, "store failure serving a stream");
            Err(StreamError::new(
                RejectCode::InternalError,
                "Internal error",
            ))
        }
    }
}

async fn describe(
    state: &AppState,
    bus: &dyn MessageBus,
    thing: &str,
    stream_id: &str,
    format: Format,
    payload: &[u8],
) -> Result<(), StreamError> {
    let req = DescribeStreamRequest::decode(format, payload)?;
    let token = req.client_token.clone();
    let stream = load_stream(state, stream_id)
        .await
        .map_err(|e| e.with_client_token(token.as_deref()))?;
    let resp = DescribeStreamResponse {
        client_token: token,
        stream_version: u64::try_from(stream.version).unwrap_or(0),
        description: stream.description.clone().unwrap_or_default(),
        files: stream
            .files
            .iter()
            .map(|f| WireFile {
                file_id: u64::from(f.file_id),
                size: f.size,
            })
            .collect(),
    };
    reply(
        bus,
        thing,
        topic(thing, stream_id, "description", format),
        resp.encode(format),
    );
    Ok(())
}

async fn get(
    state: &AppState,
    bus: &dyn MessageBus,
    thing: &str,
    stream_id: &str,
    format: Format,
    payload: &[u8],
) -> Result<(), StreamError> {
    let req = GetStreamRequest::decode(format, payload)?;
    let token = req.client_token.as_deref();
    let fail = |e: StreamError| e.with_client_token(token);
    let stream = load_stream(state, stream_id).await.map_err(fail)?;
    req.check_version(u64::try_from(stream.version).unwrap_or(0))
        .map_err(fail)?;
    let file = stream
        .files
        .iter()
        .find(|f| u64::from(f.file_id) == req.file_id)
        .ok_or_else(|| {
            fail(StreamError::new(
                RejectCode::ResourceNotFound,
                format!("Stream {stream_id} has no file {}", req.file_id),
            ))
        })?;
    let blocks = select_blocks(file.size, &req).map_err(fail)?;
    if blocks.is_empty() {
        return Ok(());
    }
    let bytes = state
        .data_plane
        .file_bytes(state, file)
        .await
        .map_err(fail)?;
    let data_topic = topic(thing, stream_id, "data", format);
    for block in blocks {
        let Some(range) = block_range(file.size, req.block_size, block) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::try_from(range.start), usize::try_from(range.end))
        else {
            continue;
        };
        let Some(chunk) = bytes.get(start..end) else {
            return Err(fail(StreamError::new(
                RejectCode::InternalError,
                "the stored file is shorter than recorded",
            )));
        };
        let body = BlockResponse {
            client_token: token,
            file_id: req.file_id,
            block_id: block,
            payload: chunk,
        }
        .encode(format);
        bus.send_to(thing, data_topic.clone(), Bytes::from(body));
    }
    Ok(())
}
