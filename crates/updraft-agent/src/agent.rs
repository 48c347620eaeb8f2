//! The agent: the handlers of the state table and the API operations, synchronous and
//! free of I/O of its own (the PAL, the resume store and the MQTT client do the I/O; time is
//! passed in). [`crate::handle`] runs it as a task and gives the application its handle.

use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use updraft_protocol::streams::DataBlock;
use updraft_protocol::streams::{
    GetStreamRequest, MAX_BITMAP_BYTES, MAX_BLOCK_SIZE, MAX_RESPONSE_BYTES, MIN_BLOCK_SIZE,
    RejectCode, Rejection,
};
use updraft_protocol::topics::Format;

use updraft_protocol::job::Protocol;

use crate::error::{Error, IngestResult, OtaError, PalStatus};
use crate::handle::{Command, Shared};
use crate::http::Fetch;
use crate::job::{DataSource, JobMessage, OtaJob, parse_job_message};
use crate::mqtt::{MqttClient, Qos, topic};
use crate::pal::{FileContext, ImageState, Pal, PalImageState};
use crate::resume::{Bitmap, Phase, ResumeState, ResumeStore};
use crate::state::{AgentEvent, AgentState, Handler, apply};
use crate::status::{self, FailReason, Report, ReportQos, SelfTest};
use crate::verify::{CertificateStore, key_for};
use crate::version::AppVersion;

/// The client token of GetStream requests (the C agent's).
const STREAM_CLIENT_TOKEN: &str = "rdy";

/// The agent's configuration (the C agent's `otaconfig*` knobs, reference §4.9).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The thing name: the MQTT client id and the topics' `{thingName}`.
    pub thing_name: String,
    /// The running firmware's version (`appFirmwareVersion`).
    pub app_version: AppVersion,
    /// Block size `l` of GetStream requests (256..131072; C default 4096).
    pub block_size: u32,
    /// Blocks asked for per request `n` (C default 1, demo 8); capped so one answer is at
    /// most 128 KiB. At most this many blocks are fetched twice after a restart.
    pub blocks_per_request: u32,
    /// The largest file accepted.
    pub max_file_size: u64,
    /// Silence after which blocks are asked for again (`otaconfigFILE_REQUEST_WAIT_MS`).
    pub request_wait: Duration,
    /// Requests without progress before the job is aborted (`otaconfigMAX_NUM_REQUEST_MOMENTUM`).
    pub max_request_momentum: u32,
    /// How long a new image may stay under test before the device resets and rolls back
    /// (`otaconfigSELF_TEST_RESPONSE_WAIT_MS`).
    pub self_test_wait: Duration,
    /// Progress is reported on the first block and every this many (`otaconfigOTA_UPDATE_STATUS_FREQUENCY`).
    pub status_frequency: u64,
    /// Accept images older than (or as old as) the running one (`otaconfigAllowDowngrade`).
    pub allow_downgrade: bool,
    /// Never accept an image older than this (an anti-rollback floor), even when newer
    /// than the running one is not required.
    pub version_floor: Option<AppVersion>,
    /// The `fileType` of firmware (`configOTA_FIRMWARE_UPDATE_FILE_TYPE_ID`); other files
    /// complete without activation or self-test.
    pub firmware_file_type: u32,
    /// Streams encoding (CBOR as the C agent; JSON is accepted by the service too).
    pub format: Format,
    /// Capacity of the event queue; blocks arriving when it is full are dropped (and asked
    /// for again later).
    pub event_queue_size: usize,
    /// How long after its last status report the agent waits before it resets or activates
    /// (both end the process on a device): MQTT clients queue publishes, and the report
    /// must be on the wire first. The C agent needs no such wait because its publish is
    /// synchronous.
    pub report_flush_wait: Duration,
    /// The data protocols this agent uses, best first (`configENABLED_DATA_PROTOCOLS`,
    /// with the first as `configOTA_PRIMARY_DATA_PROTOCOL`): a job offering several gets
    /// the first one it offers.
    pub data_protocols: Vec<Protocol>,
    /// The CA certificates (PEM) trusted for `https` pre-signed URLs; without them only
    /// `http` URLs are used.
    pub http_ca_pem: Option<String>,
}

impl AgentConfig {
    /// The defaults of the C agent's POSIX demo: 4 KiB blocks, 8 per request, 10 s request
    /// wait, 32 requests of momentum, 16 s self-test, progress every 64 blocks.
    pub fn new(thing_name: impl Into<String>, app_version: AppVersion) -> Self {
        AgentConfig {
            thing_name: thing_name.into(),
            app_version,
            block_size: 4096,
            blocks_per_request: 8,
            max_file_size: 24 * 1024 * 1024,
            request_wait: Duration::from_secs(10),
            max_request_momentum: 32,
            self_test_wait: Duration::from_secs(16),
            status_frequency: 64,
            allow_downgrade: false,
            version_floor: None,
            firmware_file_type: 0,
            format: Format::Cbor,
            event_queue_size: 64,
            report_flush_wait: Duration::from_secs(2),
            data_protocols: vec![Protocol::Mqtt, Protocol::Http],
            http_ca_pem: None,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |d: String| Err(Error::agent(OtaError::InvalidArg, d));
        if let Err(e) = updraft_protocol::ids::THING_NAME.check("thingName", &self.thing_name) {
            return bad(e.to_string());
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&u64::from(self.block_size)) {
            return bad(format!(
                "block size {} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}",
                self.block_size
            ));
        }
        if self.blocks_per_request == 0 || self.event_queue_size == 0 {
            return bad("blocks per request and the event queue size must be at least 1".into());
        }
        if self.status_frequency == 0 {
            return bad("the status frequency must be at least 1".into());
        }
        if self.data_protocols.is_empty() {
            return bad("at least one data protocol must be enabled".into());
        }
        Ok(())
    }

    /// Blocks per request after the 128 KiB cap.
    pub fn effective_blocks_per_request(&self) -> u64 {
        u64::from(self.blocks_per_request)
            .min(MAX_RESPONSE_BYTES / u64::from(self.block_size.max(1)))
            .max(1)
    }
}

/// What the agent tells the application (`OtaJobEvent_t`, same numbers).
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A firmware image is downloaded and verified: call
    /// [`crate::AgentHandle::activate_new_image`] (now or when convenient).
    Activate { job_id: String },
    /// The job failed; the running image is unchanged.
    Fail { job_id: String, reason: String },
    /// The new image runs under test: check it, then
    /// [`crate::AgentHandle::set_image_state`] Accepted or Rejected.
    StartTest { job_id: String },
    /// The image under test was refused (version check, mismatch); the device rolls back.
    SelfTestFailed { job_id: String, reason: String },
    /// A job whose document is not `afr_ota`.
    ParseCustomJob {
        job_id: String,
        document: serde_json::Value,
    },
    /// An OTA job was accepted and its download starts (or resumes).
    ReceivedJob { job_id: String },
    /// A non-firmware file was received and verified; the job SUCCEEDED.
    UpdateComplete { job_id: String },
    /// The service has no job for this device.
    NoActiveJob,
}

impl JobEvent {
    /// The C agent's number for the event.
    pub fn code(&self) -> u32 {
        match self {
            JobEvent::Activate { .. } => 0,
            JobEvent::Fail { .. } => 1,
            JobEvent::StartTest { .. } => 2,
            JobEvent::SelfTestFailed { .. } => 4,
            JobEvent::ParseCustomJob { .. } => 5,
            JobEvent::ReceivedJob { .. } => 6,
            JobEvent::UpdateComplete { .. } => 7,
            JobEvent::NoActiveJob => 8,
        }
    }
}

/// The application's callback. It runs on the agent's task: keep it short (send to a
/// channel) and do not wait on the agent from inside it.
pub type Callback = Box<dyn FnMut(JobEvent) + Send>;

/// Counters of file-block messages (`OtaAgentStatistics_t`), reset at the start of each
/// file transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    /// Block messages handed to the agent.
    pub packets_received: u64,
    /// ... of which entered the event queue.
    pub packets_queued: u64,
    /// ... of which were processed.
    pub packets_processed: u64,
    /// ... dropped: queue full, or no transfer to take them.
    pub packets_dropped: u64,
}

/// Extra data of a queued event.
#[derive(Debug, Clone)]
pub(crate) enum Data {
    None,
    Payload(Bytes),
    /// A block fetched over HTTP: the payload is the block.
    Block {
        block_id: u64,
        payload: Bytes,
    },
    /// The reason of an abort (UserAbort by default).
    Abort(OtaError),
}

/// What a handler asks of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Move to the row's next state.
    Next,
    /// Handled, but no transition (the C agent's handlers return an error code for this).
    Stay,
}

/// What ends the agent's life on a device, done once the last report had time to leave.
enum Final {
    Reset,
    Activate(Option<tokio::sync::oneshot::Sender<Result<(), Error>>>),
}

/// The job the agent works on.
#[derive(Debug, Clone)]
struct ActiveJob {
    job_id: String,
    execution_number: Option<u64>,
    queued_at: Option<u64>,
    /// The file of the job, once validated.
    file: Option<FileContext>,
    /// In self-test: the version that downloaded the image.
    updated_by: Option<AppVersion>,
    self_test: bool,
}

/// The final report of a job execution (a self-test verdict, or a failed download). A
/// document of that execution arriving later was either on its way before the report
/// (stale: ignored), or is the answer to a job request made after it — then the service
/// never got the report (lost with a dropped connection, say) and it is sent again. A
/// retried execution (same job, higher number) is a new job.
#[derive(Debug, Clone)]
struct Concluded {
    job_id: String,
    execution_number: Option<u64>,
    queued_at: Option<u64>,
    report: Report,
    /// The number of the first job request made after the report.
    after: u32,
}

/// The download in progress.
#[derive(Debug, Clone)]
struct Transfer {
    /// Numbers transfers, so HTTP answers for an abandoned one are recognised.
    id: u64,
    ctx: FileContext,
    /// The stream id (empty for an HTTP download: the checkpoint's key).
    stream: String,
    /// The pre-signed URL, for an HTTP download.
    url: Option<String>,
    /// The URL was refused (4xx) and a fresh one asked for, with no block since.
    url_refused: bool,
    missing: Bitmap,
    /// Blocks of the last request not yet received.
    outstanding: BTreeSet<u64>,
    /// Blocks written since the last checkpoint.
    dirty: bool,
}

/// The agent. Build it with [`crate::init`]; run it with [`Agent::run`].
pub struct Agent {
    pub(crate) config: AgentConfig,
    pal: Box<dyn Pal>,
    store: Box<dyn ResumeStore>,
    certs: Box<dyn CertificateStore>,
    mqtt: Box<dyn MqttClient>,
    /// Requests to the HTTP fetcher ([`crate::http`]).
    http: tokio::sync::mpsc::UnboundedSender<Fetch>,
    transfers: u64,
    callback: Callback,
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: Option<crate::handle::Receivers>,
    state: AgentState,
    queue: VecDeque<(AgentEvent, Data)>,
    job: Option<ActiveJob>,
    transfer: Option<Transfer>,
    request_deadline: Option<Instant>,
    /// While an HTTP download waits for its job again (for a fresh pre-signed URL): when to
    /// ask again, and how often it has been asked. The answer can be lost like any other.
    job_wait_deadline: Option<Instant>,
    job_wait_attempts: u32,
    self_test_deadline: Option<Instant>,
    momentum: u32,
    request_counter: u32,
    unsubscribe_on_shutdown: bool,
    /// The time of the step being processed.
    now: Instant,
    last_report: Option<Instant>,
    /// The job execution this agent last reported final, see [`Concluded`].
    concluded: Option<Concluded>,
    /// A reset or activation waiting for the last report to be flushed.
    pending: Option<(Instant, Final)>,
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: AgentConfig,
        pal: Box<dyn Pal>,
        store: Box<dyn ResumeStore>,
        certs: Box<dyn CertificateStore>,
        mqtt: Box<dyn MqttClient>,
        callback: Callback,
        shared: Arc<Shared>,
        http: tokio::sync::mpsc::UnboundedSender<Fetch>,
        rx: crate::handle::Receivers,
    ) -> Self {
        Agent {
            config,
            pal,
            store,
            certs,
            mqtt,
            http,
            transfers: 0,
            callback,
            shared,
            rx: Some(rx),
            state: AgentState::Init,
            queue: VecDeque::new(),
            job: None,
            transfer: None,
            request_deadline: None,
            job_wait_deadline: None,
            job_wait_attempts: 0,
            self_test_deadline: None,
            momentum: 0,
            // Each agent life numbers its job requests from its own random start, so
            // answers to the requests of a previous life (still in flight after a reboot)
            // are not taken for answers to this one's.
            request_counter: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(0u8) as u32
            },
            unsubscribe_on_shutdown: true,
            now: Instant::now(),
            last_report: None,
            concluded: None,
            pending: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        self.state
    }

    fn set_state(&mut self, s: AgentState) {
        if s != self.state {
            debug!(from = %self.state, to = %s, "state");
        }
        self.state = s;
        self.shared.set_state(s);
    }

    fn set_image(&mut self, s: ImageState) {
        self.shared.image_state.store(s as u8, Ordering::Relaxed);
    }

    // ---- the event loop, one step at a time ---------------------------------------------

    /// Moves Init to Ready and processes Start (what the C event loop does first).
    pub(crate) fn start(&mut self, now: Instant) {
        self.now = now;
        if self.state == AgentState::Init {
            self.set_state(AgentState::Ready);
            self.signal(AgentEvent::Start, Data::None);
            self.drain(now);
        }
    }

    pub(crate) fn signal(&mut self, event: AgentEvent, data: Data) {
        self.queue.push_back((event, data));
    }

    /// Processes queued events until none is left or the agent stopped.
    pub(crate) fn drain(&mut self, now: Instant) {
        self.now = now;
        while let Some((event, data)) = self.queue.pop_front() {
            self.dispatch(event, data, now);
            if self.state == AgentState::Stopped {
                self.queue.clear();
                break;
            }
        }
    }

    fn dispatch(&mut self, event: AgentEvent, data: Data, now: Instant) {
        let Some((handler, next)) = apply(self.state, event) else {
            if event == AgentEvent::ReceivedFileBlock {
                Shared::bump(&self.shared.dropped);
            }
            debug!(state = %self.state, %event, "event dropped: no transition");
            return;
        };
        match self.run_handler(handler, data, now) {
            Ok(Step::Next) => self.set_state(next),
            Ok(Step::Stay) => {}
            Err(e) => warn!(state = %self.state, %event, "{handler:?} failed: {e}"),
        }
    }

    fn run_handler(&mut self, handler: Handler, data: Data, now: Instant) -> Result<Step, Error> {
        match handler {
            Handler::Start => self.on_start(now),
            Handler::RequestJob => self.on_request_job(now),
            Handler::ProcessJob => self.on_process_job(data),
            Handler::InSelfTest => self.on_in_self_test(),
            Handler::InitFile => self.on_init_file(now),
            Handler::RequestData => self.on_request_data(now),
            Handler::ProcessData => self.on_process_data(data, now),
            Handler::JobNotification => self.on_job_notification(data),
            Handler::CloseFile => self.on_close_file(),
            Handler::Suspend => self.on_suspend(),
            Handler::Resume => {
                self.signal(AgentEvent::RequestJobDocument, Data::None);
                Ok(Step::Next)
            }
            Handler::UserAbort => self.on_user_abort(data),
            Handler::Shutdown => self.on_shutdown(),
        }
    }

    /// The earliest timer deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        [
            self.request_deadline,
            self.job_wait_deadline,
            self.self_test_deadline,
            self.pending.as_ref().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires the timers that are due.
    pub(crate) fn on_timers(&mut self, now: Instant) {
        self.now = now;
        if self.pending.as_ref().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, f)) = self.pending.take() {
                self.perform(f);
            }
            self.drain(now);
            return;
        }
        if self.pending.is_some() {
            return;
        }
        if self.self_test_deadline.is_some_and(|d| d <= now) {
            self.self_test_deadline = None;
            self.self_test_timeout();
        }
        if self.request_deadline.is_some_and(|d| d <= now) {
            self.request_deadline = None;
            self.signal(AgentEvent::RequestTimer, Data::None);
        }
        if self.job_wait_deadline.is_some_and(|d| d <= now) {
            self.job_wait_deadline = None;
            if self.transfer.is_none() {
                // The download ended meanwhile: nothing waits.
            } else if self.job_wait_attempts >= self.config.max_request_momentum {
                let r = status::failed_with_value(OtaError::RequestFileBlockFailed.code(), 0);
                self.fail_transfer(r, "no fresh pre-signed URL came for the download");
            } else {
                self.job_wait_attempts += 1;
                self.job_wait_deadline = Some(now + self.config.request_wait);
                self.signal(AgentEvent::RequestJobDocument, Data::None);
            }
        }
        self.drain(now);
    }

    /// Handles one command from the handle.
    pub(crate) fn command(&mut self, cmd: Command, now: Instant) {
        self.now = now;
        if self.pending.is_some() {
            // Resetting or activating: nothing else happens any more.
            let busy = || Error::agent(OtaError::AgentStopped, "the device is about to restart");
            match cmd {
                Command::SetImageState(_, reply) | Command::Activate(reply) => {
                    let _ = reply.send(Err(busy()));
                }
                Command::FileBlock { .. } | Command::HttpBlock { .. } => {
                    Shared::bump(&self.shared.dropped)
                }
                _ => {}
            }
            return;
        }
        match cmd {
            Command::Signal(event, data) => self.signal(event, data),
            Command::CheckForUpdate => {
                self.signal(AgentEvent::RequestJobDocument, Data::None);
            }
            Command::FileBlock {
                stream,
                format,
                payload,
            } => {
                let ours = self
                    .transfer
                    .as_ref()
                    .is_some_and(|t| t.stream == stream && format == self.config.format);
                if ours {
                    self.signal(AgentEvent::ReceivedFileBlock, Data::Payload(payload));
                } else {
                    Shared::bump(&self.shared.dropped);
                    debug!(%stream, "block for no active transfer dropped");
                }
            }
            Command::HttpBlock {
                transfer,
                block_id,
                payload,
            } => {
                if self.transfer.as_ref().is_some_and(|t| t.id == transfer) {
                    self.signal(
                        AgentEvent::ReceivedFileBlock,
                        Data::Block { block_id, payload },
                    );
                } else {
                    Shared::bump(&self.shared.dropped);
                    debug!("HTTP block of an abandoned transfer dropped");
                }
            }
            Command::HttpFailed {
                transfer,
                status,
                detail,
            } => self.on_http_failed(transfer, status, &detail),
            Command::JobDocument(payload) => {
                self.signal(AgentEvent::ReceivedJobDocument, Data::Payload(payload));
            }
            Command::StreamRejected {
                stream,
                format,
                payload,
            } => self.on_stream_rejected(&stream, format, &payload),
            Command::CustomJobStatus {
                job_id,
                status,
                details,
            } => {
                self.report(&job_id, crate::status::custom(status, &details));
                if status.is_terminal() {
                    self.signal(AgentEvent::RequestJobDocument, Data::None);
                }
            }
            Command::SetImageState(s, reply) => {
                let r = self.set_image_state(s);
                let _ = reply.send(r);
            }
            Command::Activate(reply) => self.finally(Final::Activate(Some(reply))),
            Command::Shutdown { unsubscribe } => {
                self.unsubscribe_on_shutdown = unsubscribe;
                if self.state != AgentState::Stopped {
                    self.set_state(AgentState::ShuttingDown);
                    self.signal(AgentEvent::Shutdown, Data::None);
                }
            }
        }
        self.drain(now);
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn notify(&mut self, e: JobEvent) {
        debug!(?e, "callback");
        (self.callback)(e);
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, qos: Qos) -> Result<(), Error> {
        self.mqtt.publish(topic, payload, qos)
    }

    fn report(&mut self, job_id: &str, r: Report) {
        let qos = match r.qos {
            ReportQos::AtMostOnce => Qos::AtMostOnce,
            ReportQos::AtLeastOnce => Qos::AtLeastOnce,
        };
        info!(job = job_id, status = %r.payload, "job status");
        self.last_report = Some(self.now);
        let t = topic::update(&self.config.thing_name, job_id);
        if let Err(e) = self.publish(&t, r.payload.into_bytes(), qos) {
            warn!(job = job_id, "status report not sent: {e}");
        }
    }

    fn reason_of(r: &Report) -> String {
        serde_json::from_str::<serde_json::Value>(&r.payload)
            .ok()
            .and_then(|v| v["statusDetails"]["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn store_clear(&mut self) {
        if let Err(e) = self.store.clear() {
            warn!("clearing the resume state: {e}");
        }
    }

    /// Flushes the PAL and records the received blocks, if any since the last checkpoint.
    fn checkpoint(&mut self) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if !t.dirty {
            return;
        }
        if let Err(e) = self.pal.flush(&t.ctx) {
            warn!("PAL flush failed, progress not recorded: {e}");
            return;
        }
        let state = ResumeState::new(&t.ctx, &t.stream, &t.missing, Phase::Downloading);
        match self.store.save(&state) {
            Ok(()) => t.dirty = false,
            Err(e) => warn!("saving the resume state: {e}"),
        }
    }

    fn running_self_test(&mut self) -> bool {
        matches!(
            self.pal.get_platform_image_state(),
            Ok(PalImageState::PendingCommit)
        )
    }

    /// The running image is uncommitted but no self-test job vouches for it: reject it and
    /// reset, which rolls back (the C agent's rule, reference §4.5).
    fn reject_unvouched_image(&mut self, why: &str) {
        warn!("the running image is pending commit but {why}: rolling back");
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Rejected) {
            warn!("rejecting the image: {e}");
        }
        self.set_image(ImageState::Rejected);
        self.reset_and_stop();
    }

    fn reset_and_stop(&mut self) {
        self.self_test_deadline = None;
        self.request_deadline = None;
        self.queue.clear();
        self.finally(Final::Reset);
    }

    /// Resets or activates once the last report had `report_flush_wait` to leave.
    fn finally(&mut self, f: Final) {
        let at = self
            .last_report
            .map(|t| t + self.config.report_flush_wait)
            .filter(|at| *at > self.now);
        match at {
            Some(at) => {
                debug!("waiting for the last report to leave before restarting");
                self.pending = Some((at, f));
            }
            None => self.perform(f),
        }
    }

    fn perform(&mut self, f: Final) {
        match f {
            Final::Reset => {
                if let Err(e) = self.pal.reset_device() {
                    warn!("reset failed: {e}");
                }
                // A reset that returns means the platform reboots on its own terms: stop.
                self.unsubscribe_on_shutdown = false;
                self.queue.clear();
                self.signal(AgentEvent::Shutdown, Data::None);
            }
            Final::Activate(reply) => {
                let r = self.activate_new_image();
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// Ends the active transfer with a failure: the image is rejected, the job reported
    /// FAILED, the application told, the checkpoint forgotten, the transfer closed.
    fn fail_transfer(&mut self, report: Report, detail: &str) {
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Rejected) {
            warn!("rejecting the received image: {e}");
        }
        self.set_image(ImageState::Rejected);
        let reason = Self::reason_of(&report);
        if let Some(job) = self.job.clone() {
            let job_id = job.job_id.clone();
            warn!(job = %job_id, "{detail}");
            self.report(&job_id, report.clone());
            self.remember_final(&job, report);
            self.notify(JobEvent::Fail {
                job_id,
                reason: format!("{reason} ({detail})"),
            });
        }
        self.store_clear();
        self.job = None;
        self.request_deadline = None;
        self.signal(AgentEvent::CloseFile, Data::None);
    }

    /// Releases the transfer: unsubscribe from its topics and let go of the PAL file.
    fn release_transfer(&mut self) {
        self.request_deadline = None;
        self.job_wait_deadline = None;
        if let Some(t) = self.transfer.take() {
            let ops: &[&str] = if t.url.is_some() {
                &[]
            } else {
                &["data", "rejected"]
            };
            for op in ops {
                let f = topic::stream(&self.config.thing_name, &t.stream, op, self.config.format);
                if let Err(e) = self.mqtt.unsubscribe(&f) {
                    debug!("{e}");
                }
            }
            if let Err(e) = self.pal.abort(&t.ctx) {
                warn!("PAL abort: {e}");
            }
        }
    }

    // ---- handlers ----------------------------------------------------------------------------

    fn on_start(&mut self, now: Instant) -> Result<Step, Error> {
        match self.pal.get_platform_image_state() {
            Ok(PalImageState::PendingCommit) => {
                info!(
                    "the running image {} is under test: self-test timer started",
                    self.config.app_version
                );
                self.self_test_deadline = Some(now + self.config.self_test_wait);
                self.set_image(ImageState::Testing);
            }
            Ok(s) => debug!("platform image state {s}"),
            Err(e) => warn!("reading the platform image state: {e}"),
        }
        self.signal(AgentEvent::RequestJobDocument, Data::None);
        Ok(Step::Next)
    }

    fn on_request_job(&mut self, now: Instant) -> Result<Step, Error> {
        let thing = self.config.thing_name.clone();
        let result = (|| {
            self.mqtt
                .subscribe(&topic::notify_next(&thing), Qos::AtLeastOnce)?;
            self.mqtt
                .subscribe(&topic::next_get_accepted(&thing), Qos::AtLeastOnce)?;
            self.mqtt
                .subscribe(&topic::next_get_rejected(&thing), Qos::AtLeastOnce)?;
            let token = client_token(self.request_counter, &thing);
            let body = serde_json::json!({ "clientToken": token }).to_string();
            self.publish(
                &topic::next_get(&thing),
                body.into_bytes(),
                Qos::AtLeastOnce,
            )
        })();
        match result {
            Ok(()) => {
                self.request_counter = self.request_counter.wrapping_add(1);
                self.request_deadline = None;
                Ok(Step::Next)
            }
            Err(e) => {
                // Retried by the request timer (RequestingJob x RequestTimer).
                self.request_deadline = Some(now + self.config.request_wait);
                Err(Error::agent(OtaError::RequestJobFailed, e.to_string()))
            }
        }
    }

    fn on_process_job(&mut self, data: Data) -> Result<Step, Error> {
        let Data::Payload(payload) = data else {
            return Err(Error::agent(OtaError::EmptyJobDocument, "no payload"));
        };
        let job = match parse_job_message(&payload) {
            Ok(JobMessage::NoJob) => {
                self.job_wait_deadline = None;
                if self.transfer.is_some() {
                    // The job being downloaded is gone (canceled or deleted).
                    self.abandon_transfer();
                }
                self.notify(JobEvent::NoActiveJob);
                if self.running_self_test() {
                    self.reject_unvouched_image("there is no job");
                }
                return Ok(Step::Stay);
            }
            Ok(JobMessage::Custom { job_id, document }) => {
                self.notify(JobEvent::ParseCustomJob { job_id, document });
                return Ok(Step::Stay);
            }
            Ok(JobMessage::Ota(job))
                if self.concluded.as_ref().is_some_and(|c| {
                    c.job_id == job.job_id
                        && c.execution_number == job.execution_number
                        && c.queued_at == job.queued_at
                }) =>
            {
                // One of this agent's requests made since the verdict (numbers wrap).
                let since = self.request_counter.wrapping_sub(
                    self.concluded
                        .as_ref()
                        .map_or(self.request_counter, |c| c.after),
                );
                if let Some(c) = self.concluded.clone()
                    && request_number(&payload).is_some_and(|n| n.wrapping_sub(c.after) < since)
                {
                    info!(job = %job.job_id, "the service still shows the job open: reporting the verdict again");
                    self.report(&c.job_id, c.report);
                } else {
                    // Sent before the service had the verdict (a notify-next or an answer
                    // in flight): acting on it would contradict the verdict.
                    debug!(job = %job.job_id, "stale document of a concluded job: ignored");
                }
                return Ok(Step::Stay);
            }
            Ok(JobMessage::Ota(job)) => *job,
            Err(e) => {
                if let Some(job_id) = &e.job_id {
                    let r = status::failed_with_value(
                        OtaError::JobParserError.code(),
                        e.code.code() as u32,
                    );
                    let job_id = job_id.clone();
                    let reason = Self::reason_of(&r);
                    self.report(&job_id, r);
                    self.notify(JobEvent::Fail {
                        job_id,
                        reason: format!("{reason} ({})", e.detail),
                    });
                }
                return Err(e.into());
            }
        };
        if job.self_test().is_some() {
            self.job = Some(ActiveJob {
                job_id: job.job_id.clone(),
                execution_number: job.execution_number,
                queued_at: job.queued_at,
                file: job
                    .file_context(self.config.block_size, self.config.max_file_size)
                    .ok(),
                updated_by: job.updated_by(),
                self_test: true,
            });
            self.signal(AgentEvent::StartSelfTest, Data::None);
            return Ok(Step::Next);
        }
        if self.running_self_test() {
            self.reject_unvouched_image("the job is not in self-test");
            return Ok(Step::Stay);
        }
        match self.transfer.as_ref().map(|t| t.ctx.job_id == job.job_id) {
            // The same job again (after a suspend or a reconnect): keep the transfer.
            Some(true) => {
                self.job_wait_deadline = None;
                // An HTTP download takes the fresh pre-signed URL of this delivery.
                let fresh = job.data_source(
                    &self.config.data_protocols,
                    self.config.http_ca_pem.is_some(),
                );
                if let (Some(t), Ok(DataSource::Http(url))) = (self.transfer.as_mut(), fresh)
                    && t.url.is_some()
                {
                    t.url = Some(url);
                }
                self.signal(AgentEvent::CreateFile, Data::None);
                return Ok(Step::Next);
            }
            // Another job replaced the one being downloaded: abandon it (no status for it,
            // as the C agent).
            Some(false) => self.abandon_transfer(),
            None => {
                // The same job again once its image is verified and waits for activation (a
                // notify-next that was on its way while the download finished): the image
                // is there, nothing to download.
                let verified = matches!(
                    self.store.load(),
                    Ok(Some(ref s)) if s.job_id == job.job_id && s.phase == Phase::Verified
                );
                if verified {
                    // The service shows no `self_test` (we are here, not in the self-test
                    // branch): the `ready` report was lost, e.g. queued in a connection that
                    // dropped. Send it again, or the new image would find the job not in
                    // self-test after the reboot and roll back.
                    info!(job = %job.job_id, "the image waits for activation; reporting ready again");
                    let ready = status::self_test(SelfTest::Ready, self.config.app_version);
                    self.report(&job.job_id, ready);
                    return Ok(Step::Stay);
                }
            }
        }
        self.start_job(&job)
    }

    /// Validates a new job, opens its file (resuming a checkpoint when one matches) and
    /// queues the transfer.
    fn start_job(&mut self, job: &OtaJob) -> Result<Step, Error> {
        let job_id = job.job_id.clone();
        self.job = Some(ActiveJob {
            job_id: job_id.clone(),
            execution_number: job.execution_number,
            queued_at: job.queued_at,
            file: None,
            updated_by: None,
            self_test: false,
        });
        let checked = job
            .file_context(self.config.block_size, self.config.max_file_size)
            .and_then(|ctx| {
                let source = job.data_source(
                    &self.config.data_protocols,
                    self.config.http_ca_pem.is_some(),
                )?;
                Ok((ctx, source))
            });
        let (ctx, source) = match checked {
            Ok(c) => c,
            Err(e) => {
                let r = match &e {
                    Error::JobParse { code, .. } => status::failed_with_value(
                        OtaError::JobParserError.code(),
                        code.code() as u32,
                    ),
                    other => status::failed_with_value(other.ota_error().code(), 0),
                };
                let reason = Self::reason_of(&r);
                self.report(&job_id, r);
                self.notify(JobEvent::Fail {
                    job_id,
                    reason: format!("{reason} ({e})"),
                });
                self.job = None;
                return Err(e);
            }
        };
        let (stream, url) = match source {
            DataSource::Stream(s) => (s, None),
            DataSource::Http(u) => (String::new(), Some(u)),
        };
        let blocks = ctx.file_size.div_ceil(u64::from(ctx.block_size));
        let resumed = match self.store.load() {
            Ok(Some(s)) if s.matches(&ctx, &stream) && s.phase == Phase::Downloading => {
                s.bitmap().filter(|_| self.pal.reopen_file(&ctx).is_ok())
            }
            Ok(_) => None,
            Err(e) => {
                warn!("the resume state is unusable, starting over: {e}");
                None
            }
        };
        let missing = match resumed {
            Some(m) => {
                info!(
                    job = %job_id,
                    "resuming: {} of {blocks} blocks already written",
                    blocks - m.missing()
                );
                m
            }
            None => {
                self.store_clear();
                if let Err(e) = self.pal.create_file(&ctx) {
                    let r = status::failed_with_value(e.code(), 0);
                    let reason = Self::reason_of(&r);
                    self.report(&job_id, r);
                    self.notify(JobEvent::Fail {
                        job_id,
                        reason: format!("{reason} ({e})"),
                    });
                    self.job = None;
                    return Err(e.into());
                }
                let m = Bitmap::all_missing(blocks);
                if let Err(e) =
                    self.store
                        .save(&ResumeState::new(&ctx, &stream, &m, Phase::Downloading))
                {
                    warn!("saving the resume state: {e}");
                }
                m
            }
        };
        if let Some(j) = self.job.as_mut() {
            j.file = Some(ctx.clone());
        }
        self.transfers += 1;
        info!(
            job = %job_id,
            "downloading {} bytes over {}",
            ctx.file_size,
            match &url {
                Some(u) => format!("HTTP from {}", crate::http::redact(u)),
                None => format!("MQTT stream {stream}"),
            }
        );
        self.transfer = Some(Transfer {
            id: self.transfers,
            ctx,
            stream,
            url,
            url_refused: false,
            missing,
            outstanding: BTreeSet::new(),
            dirty: false,
        });
        self.shared.reset_statistics();
        self.set_image(ImageState::Unknown);
        self.notify(JobEvent::ReceivedJob { job_id });
        self.signal(AgentEvent::CreateFile, Data::None);
        Ok(Step::Next)
    }

    fn on_in_self_test(&mut self) -> Result<Step, Error> {
        let Some(job) = self.job.clone() else {
            return Ok(Step::Next);
        };
        if !self.running_self_test() {
            // Downloaded and verified, `ready` reported, but not activated yet (the
            // process restarted in between): offer the activation again.
            let awaiting = matches!(
                self.store.load(),
                Ok(Some(ref s)) if s.job_id == job.job_id && s.phase == Phase::Verified
            );
            if awaiting {
                info!(job = %job.job_id, "the verified image still waits for activation");
                self.notify(JobEvent::Activate {
                    job_id: job.job_id.clone(),
                });
                return Ok(Step::Next);
            }
            // The job says self-test but this image is not under test: the new image
            // was rolled back (self-test timeout, crash). Refuse the job.
            let code = OtaError::ImageStateMismatch.code();
            let r = status::failed(FailReason::Rejected, code);
            let reason = Self::reason_of(&r);
            warn!(job = %job.job_id, "job in self-test but the image is not: {reason}");
            self.report(&job.job_id, r);
            self.notify(JobEvent::SelfTestFailed {
                job_id: job.job_id.clone(),
                reason,
            });
            self.store_clear();
            self.job = None;
            return Ok(Step::Next);
        }
        let running = self.config.app_version;
        let firmware = job
            .file
            .as_ref()
            .is_none_or(|f| f.file_id == 0 && f.file_type == self.config.firmware_file_type);
        let refused = if self.config.allow_downgrade || !firmware {
            None
        } else {
            match job.updated_by {
                Some(u) if u == running => Some(OtaError::SameFirmwareVersion),
                Some(u) if u > running => Some(OtaError::DowngradeNotAllowed),
                _ if self.config.version_floor.is_some_and(|f| running < f) => {
                    Some(OtaError::DowngradeNotAllowed)
                }
                _ => None,
            }
        };
        if let Some(code) = refused {
            let r = status::failed(FailReason::Rejected, code.code());
            let reason = Self::reason_of(&r);
            warn!(job = %job.job_id, "{code}: rolling back");
            if let Err(e) = self.pal.set_platform_image_state(ImageState::Rejected) {
                warn!("rejecting the image: {e}");
            }
            self.set_image(ImageState::Rejected);
            self.report(&job.job_id, r);
            self.notify(JobEvent::SelfTestFailed {
                job_id: job.job_id.clone(),
                reason,
            });
            self.store_clear();
            self.job = None;
            self.reset_and_stop();
            return Ok(Step::Next);
        }
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Testing) {
            warn!("marking the image Testing: {e}");
        }
        self.set_image(ImageState::Testing);
        self.report(&job.job_id, status::self_test(SelfTest::Active, running));
        self.notify(JobEvent::StartTest {
            job_id: job.job_id.clone(),
        });
        Ok(Step::Next)
    }

    fn on_init_file(&mut self, now: Instant) -> Result<Step, Error> {
        let Some(t) = self.transfer.as_ref() else {
            return Err(Error::agent(OtaError::NoActiveJob, "no transfer to start"));
        };
        if t.url.is_some() {
            // HTTP: nothing to subscribe to.
            self.momentum = 0;
            self.signal(AgentEvent::RequestFileBlock, Data::None);
            return Ok(Step::Next);
        }
        let stream = t.stream.clone();
        let thing = self.config.thing_name.clone();
        let fmt = self.config.format;
        let result = self
            .mqtt
            .subscribe(
                &topic::stream(&thing, &stream, "data", fmt),
                Qos::AtMostOnce,
            )
            .and_then(|()| {
                self.mqtt.subscribe(
                    &topic::stream(&thing, &stream, "rejected", fmt),
                    Qos::AtMostOnce,
                )
            });
        if let Err(e) = result {
            self.momentum += 1;
            if self.momentum > self.config.max_request_momentum {
                self.momentum = 0;
                self.signal(
                    AgentEvent::UserAbort,
                    Data::Abort(OtaError::InitFileTransferFailed),
                );
            } else {
                self.request_deadline = Some(now + self.config.request_wait);
            }
            return Err(Error::agent(
                OtaError::InitFileTransferFailed,
                e.to_string(),
            ));
        }
        self.momentum = 0;
        self.signal(AgentEvent::RequestFileBlock, Data::None);
        Ok(Step::Next)
    }

    fn on_request_data(&mut self, now: Instant) -> Result<Step, Error> {
        let Some(t) = self.transfer.as_ref() else {
            return Err(Error::agent(OtaError::NoActiveJob, "no transfer"));
        };
        if t.missing.missing() == 0 {
            self.finish();
            return Ok(Step::Next);
        }
        self.momentum += 1;
        if self.momentum > self.config.max_request_momentum {
            warn!(
                "{} requests without a block: aborting",
                self.config.max_request_momentum
            );
            self.momentum = 0;
            self.signal(AgentEvent::UserAbort, Data::Abort(OtaError::MomentumAbort));
            return Ok(Step::Next);
        }
        self.checkpoint();
        let Some(t) = self.transfer.as_mut() else {
            return Err(Error::agent(OtaError::NoActiveJob, "no transfer"));
        };
        if let Some(url) = &t.url {
            let per_request = self.config.effective_blocks_per_request();
            let first = t.missing.missing_blocks().next().unwrap_or(0);
            let run = t
                .missing
                .missing_blocks()
                .enumerate()
                .take_while(|(i, b)| *b == first + *i as u64)
                .take(usize::try_from(per_request).unwrap_or(usize::MAX))
                .count() as u64;
            t.outstanding = (first..first + run).collect();
            let fetch = Fetch {
                transfer: t.id,
                url: url.clone(),
                first_block: first,
                blocks: run,
                block_size: t.ctx.block_size,
                file_size: t.ctx.file_size,
            };
            self.request_deadline = Some(now + self.config.request_wait);
            if self.http.send(fetch).is_err() {
                warn!("the HTTP fetcher is gone; the request timer asks again");
            }
            return Ok(Step::Next);
        }
        let (req, wanted) = next_request(
            &t.missing,
            t.ctx.file_id,
            t.ctx.block_size,
            self.config.effective_blocks_per_request(),
        );
        t.outstanding = wanted;
        let topic = topic::stream(
            &self.config.thing_name,
            &t.stream,
            "get",
            self.config.format,
        );
        let payload = req.encode(self.config.format);
        self.request_deadline = Some(now + self.config.request_wait);
        if let Err(e) = self.publish(&topic, payload, Qos::AtMostOnce) {
            // The request timer asks again.
            warn!("block request not sent: {e}");
        }
        Ok(Step::Next)
    }

    fn on_process_data(&mut self, data: Data, now: Instant) -> Result<Step, Error> {
        Shared::bump(&self.shared.processed);
        let Some(t) = self.transfer.as_mut() else {
            return Err(Error::agent(OtaError::NoActiveJob, "no transfer"));
        };
        let uninit = PalStatus::Uninitialized.code() << 24;
        let block = match data {
            Data::Payload(payload) => match DataBlock::decode(self.config.format, &payload) {
                Ok(b) => b,
                Err(e) => {
                    let r = status::failed_with_value(uninit, IngestResult::BadData.code() as u32);
                    self.fail_transfer(r, &format!("malformed block message: {}", e.message));
                    return Ok(Step::Next);
                }
            },
            Data::Block { block_id, payload } => DataBlock {
                client_token: None,
                file_id: u64::from(t.ctx.file_id),
                block_id,
                payload: payload.to_vec(),
            },
            _ => return Ok(Step::Stay),
        };
        if block.file_id != u64::from(t.ctx.file_id) {
            debug!(file = block.file_id, "block of another file ignored");
            return Ok(Step::Stay);
        }
        let total = t.missing.len();
        let bs = u64::from(t.ctx.block_size);
        let expected_len = if block.block_id + 1 < total {
            Some(bs)
        } else if block.block_id + 1 == total {
            Some(t.ctx.file_size - (total - 1) * bs)
        } else {
            None
        };
        if expected_len != Some(block.payload.len() as u64) {
            let detail = format!(
                "block {} has {} bytes, {} expected (file {} bytes, {} blocks)",
                block.block_id,
                block.payload.len(),
                expected_len.map_or("none".into(), |n| n.to_string()),
                t.ctx.file_size,
                total
            );
            let r = status::failed_with_value(uninit, IngestResult::BlockOutOfRange.code() as u32);
            self.fail_transfer(r, &detail);
            return Ok(Step::Next);
        }
        if !t.missing.is_missing(block.block_id) {
            debug!(block = block.block_id, "duplicate block ignored");
            t.outstanding.remove(&block.block_id);
            return Ok(Step::Stay);
        }
        if let Err(e) = self
            .pal
            .write_block(&t.ctx, block.block_id * bs, &block.payload)
        {
            let r =
                status::failed_with_value(e.code(), IngestResult::WriteBlockFailed.code() as u32);
            self.fail_transfer(r, &format!("writing block {}: {e}", block.block_id));
            return Ok(Step::Next);
        }
        t.missing.mark_received(block.block_id);
        t.outstanding.remove(&block.block_id);
        t.dirty = true;
        t.url_refused = false;
        self.momentum = 0;
        self.request_deadline = Some(now + self.config.request_wait);
        let remaining = t.missing.missing();
        let received = total - remaining;
        let batch_done = t.outstanding.is_empty();
        let job_id = t.ctx.job_id.clone();
        if received == 1 || received % self.config.status_frequency == 0 {
            self.report(&job_id, status::receive(received, total));
        }
        if remaining == 0 {
            self.finish();
        } else if batch_done {
            self.signal(AgentEvent::RequestFileBlock, Data::None);
        }
        Ok(Step::Next)
    }

    /// Every block is written: close, verify, check the version, report, and release.
    fn finish(&mut self) {
        self.request_deadline = None;
        self.checkpoint();
        let Some(t) = self.transfer.as_ref() else {
            return;
        };
        let ctx = t.ctx.clone();
        let stream = t.stream.clone();
        if let Err(e) = self.pal.close_file(&ctx) {
            let r = status::failed_with_value(e.code(), IngestResult::FileCloseFail.code() as u32);
            self.fail_transfer(r, &format!("closing the file: {e}"));
            return;
        }
        let verified = key_for(self.certs.as_ref(), &ctx.cert_file)
            .and_then(|key| self.pal.verify_signature(&ctx, &key));
        if let Err(e) = verified {
            let r = status::failed_with_value(e.code(), IngestResult::SigCheckFail.code() as u32);
            self.fail_transfer(r, &format!("verification failed: {e}"));
            return;
        }
        let firmware = ctx.file_type == self.config.firmware_file_type;
        if firmware && !self.config.allow_downgrade {
            match self.pal.image_version(&ctx) {
                Ok(Some(v)) => {
                    let running = self.config.app_version;
                    let refused = if v == running {
                        Some(OtaError::SameFirmwareVersion)
                    } else if v < running || self.config.version_floor.is_some_and(|f| v < f) {
                        Some(OtaError::DowngradeNotAllowed)
                    } else {
                        None
                    };
                    if let Some(code) = refused {
                        let r = status::failed(FailReason::Rejected, code.code());
                        self.fail_transfer(
                            r,
                            &format!("the image is version {v}, running {running}: {code}"),
                        );
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => warn!("reading the image version: {e}"),
            }
        }
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Testing) {
            let r = status::failed_with_value(e.code(), IngestResult::FileCloseFail.code() as u32);
            self.fail_transfer(r, &format!("marking the image Testing: {e}"));
            return;
        }
        self.set_image(ImageState::Testing);
        let job_id = ctx.job_id.clone();
        if firmware {
            if let Some(t) = self.transfer.as_ref()
                && let Err(e) = self.store.save(&ResumeState::new(
                    &ctx,
                    &stream,
                    &t.missing,
                    Phase::Verified,
                ))
            {
                warn!("saving the resume state: {e}");
            }
            self.report(
                &job_id,
                status::self_test(SelfTest::Ready, self.config.app_version),
            );
            info!(job = %job_id, "image verified; waiting for activation");
            self.notify(JobEvent::Activate { job_id });
        } else {
            // The C agent's template for non-firmware files: the file type as the version.
            self.report(
                &job_id,
                status::accepted(AppVersion::from_u32(ctx.file_type), AppVersion::default()),
            );
            self.store_clear();
            self.notify(JobEvent::UpdateComplete { job_id });
            self.job = None;
        }
        self.signal(AgentEvent::CloseFile, Data::None);
    }

    fn on_job_notification(&mut self, data: Data) -> Result<Step, Error> {
        let Data::Payload(payload) = data else {
            return Ok(Step::Stay);
        };
        let active = self.transfer.as_ref().map(|t| t.ctx.job_id.clone());
        let same = match parse_job_message(&payload) {
            Ok(JobMessage::Ota(j)) => Some(j.job_id) == active,
            Err(e) => e.job_id.is_some() && e.job_id == active,
            _ => false,
        };
        if same {
            // A second copy of the active job: the C agent would abort and restart the
            // download here (reference §1.9); continuing is the right answer.
            debug!("the active job was announced again: download continues");
            return Ok(Step::Stay);
        }
        self.abandon_transfer();
        self.signal(AgentEvent::RequestJobDocument, Data::None);
        Ok(Step::Next)
    }

    /// Drops the download of a job that was replaced or canceled.
    fn abandon_transfer(&mut self) {
        info!("the active job was replaced or canceled: abandoning its download");
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Aborted) {
            warn!("aborting the received image: {e}");
        }
        self.set_image(ImageState::Aborted);
        self.release_transfer();
        self.store_clear();
        self.job = None;
    }

    fn on_close_file(&mut self) -> Result<Step, Error> {
        self.release_transfer();
        Ok(Step::Next)
    }

    fn on_suspend(&mut self) -> Result<Step, Error> {
        self.request_deadline = None;
        self.checkpoint();
        Ok(Step::Next)
    }

    fn on_user_abort(&mut self, data: Data) -> Result<Step, Error> {
        let code = match data {
            Data::Abort(c) => c,
            _ => OtaError::UserAbort,
        };
        let Some(job) = self.job.take() else {
            return Err(Error::agent(OtaError::NoActiveJob, "nothing to abort"));
        };
        if let Err(e) = self.pal.set_platform_image_state(ImageState::Aborted) {
            warn!("aborting the image: {e}");
        }
        self.set_image(ImageState::Aborted);
        let r = status::failed(FailReason::Aborted, code.code());
        let reason = Self::reason_of(&r);
        self.report(&job.job_id, r.clone());
        // A document of this execution still on its way must not restart the download.
        self.remember_final(&job, r);
        self.notify(JobEvent::Fail {
            job_id: job.job_id,
            reason: format!("{reason} ({code})"),
        });
        self.release_transfer();
        self.store_clear();
        if job.self_test {
            self.self_test_deadline = None;
        }
        Ok(Step::Next)
    }

    fn on_shutdown(&mut self) -> Result<Step, Error> {
        self.checkpoint();
        self.request_deadline = None;
        self.self_test_deadline = None;
        if self.unsubscribe_on_shutdown {
            let thing = self.config.thing_name.clone();
            for f in [
                topic::notify_next(&thing),
                topic::next_get_accepted(&thing),
                topic::next_get_rejected(&thing),
            ] {
                if let Err(e) = self.mqtt.unsubscribe(&f) {
                    debug!("{e}");
                }
            }
            self.release_transfer();
        }
        info!("agent stopped");
        Ok(Step::Next)
    }

    /// An HTTP fetch failed after its retries. A refused URL (400/403/404: the pre-signed
    /// URL expired or is not valid) is replaced once by asking for the job document again,
    /// which carries a freshly signed one, as the C agent's demo does; refused again with
    /// no block in between, the job fails with `0x00000008: 0x<status>`
    /// (`RequestFileBlockFailed` and the HTTP status). Anything else is left to the request
    /// timer, whose retries count against `max_request_momentum`.
    fn on_http_failed(&mut self, transfer: u64, status: Option<u16>, detail: &str) {
        let Some(t) = self.transfer.as_mut().filter(|t| t.id == transfer) else {
            return;
        };
        match status {
            Some(code @ (400 | 401 | 403 | 404 | 410)) => {
                if !t.url_refused {
                    t.url_refused = true;
                    warn!("HTTP {code} for the file: asking for the job again for a fresh URL");
                    self.job_wait_attempts = 0;
                    self.job_wait_deadline = Some(self.now + self.config.request_wait);
                    self.signal(AgentEvent::RequestJobDocument, Data::None);
                } else {
                    let r = status::failed_with_value(
                        OtaError::RequestFileBlockFailed.code(),
                        u32::from(code),
                    );
                    self.fail_transfer(
                        r,
                        &format!("HTTP {code} for the file even with a fresh URL: {detail}"),
                    );
                }
            }
            // Final answers that asking again will not change: a server that ignores the
            // Range header, a redirect, an unsatisfiable range.
            Some(code @ (200 | 300..=399 | 416)) => {
                let r = status::failed_with_value(
                    OtaError::RequestFileBlockFailed.code(),
                    u32::from(code),
                );
                self.fail_transfer(r, &format!("HTTP {code} for the file: {detail}"));
            }
            _ => warn!("HTTP download: {detail}; the request timer asks again"),
        }
    }

    fn on_stream_rejected(&mut self, stream: &str, format: Format, payload: &[u8]) {
        if self.transfer.as_ref().is_none_or(|t| t.stream != stream) {
            return;
        }
        let rejection = match Rejection::decode(format, payload) {
            Ok(r) => r,
            Err(e) => {
                debug!("undecodable stream rejection: {}", e.message);
                return;
            }
        };
        match rejection.reject_code() {
            // Transient, or not ours to judge: the request timer asks again.
            Some(RejectCode::InternalError) | None => {
                warn!(
                    "stream {stream} refused a request ({}: {}); asking again later",
                    rejection.code, rejection.message
                );
            }
            Some(code) => {
                warn!(
                    "stream {stream} refused the download ({code}: {}): aborting",
                    rejection.message
                );
                self.signal(
                    AgentEvent::UserAbort,
                    Data::Abort(OtaError::RequestFileBlockFailed),
                );
            }
        }
    }

    fn self_test_timeout(&mut self) {
        if self.running_self_test() {
            warn!(
                "the self-test did not finish within {:?}: resetting to roll back",
                self.config.self_test_wait
            );
            self.reset_and_stop();
        }
    }

    // ---- API operations ----------------------------------------------------------------------

    /// `OTA_SetImageState`.
    pub(crate) fn set_image_state(&mut self, state: ImageState) -> Result<(), Error> {
        let self_test_job = self.job.as_ref().filter(|j| j.self_test).cloned();
        match state {
            ImageState::Accepted => {
                self.pal.set_platform_image_state(ImageState::Accepted)?;
                self.set_image(ImageState::Accepted);
                self.self_test_deadline = None;
                if let Some(job) = self_test_job {
                    let updated_by = job.updated_by.unwrap_or_default();
                    let verdict = status::accepted(self.config.app_version, updated_by);
                    self.conclude(&job, verdict);
                }
                Ok(())
            }
            ImageState::Rejected => {
                self.pal.set_platform_image_state(ImageState::Rejected)?;
                self.set_image(ImageState::Rejected);
                if let Some(job) = self_test_job {
                    self.conclude(&job, status::failed(FailReason::Rejected, 0));
                    self.reset_and_stop();
                }
                Ok(())
            }
            ImageState::Aborted => {
                self.signal(AgentEvent::UserAbort, Data::None);
                Ok(())
            }
            ImageState::Testing => {
                self.pal.set_platform_image_state(ImageState::Testing)?;
                self.set_image(ImageState::Testing);
                Ok(())
            }
            ImageState::Unknown => Err(Error::agent(
                OtaError::InvalidArg,
                "the image state cannot be set to Unknown",
            )),
        }
    }

    /// Reports the self-test verdict and closes the job.
    fn conclude(&mut self, job: &ActiveJob, verdict: Report) {
        self.report(&job.job_id, verdict.clone());
        self.store_clear();
        self.remember_final(job, verdict);
        self.job = None;
    }

    fn remember_final(&mut self, job: &ActiveJob, report: Report) {
        self.concluded = Some(Concluded {
            job_id: job.job_id.clone(),
            execution_number: job.execution_number,
            queued_at: job.queued_at,
            report,
            after: self.request_counter,
        });
    }

    /// `OTA_ActivateNewImage`.
    pub(crate) fn activate_new_image(&mut self) -> Result<(), Error> {
        // Forget the checkpoint first: activation normally does not return, and a device that
        // comes back on the old image must not be offered the same activation again (it
        // reports the self-test failure instead).
        let saved = self.store.load().ok().flatten();
        self.store_clear();
        if let Err(e) = self.pal.activate_new_image() {
            if let Some(s) = saved
                && let Err(se) = self.store.save(&s)
            {
                warn!("restoring the resume state: {se}");
            }
            return Err(Error::agent(OtaError::ActivateFailed, e.to_string()));
        }
        info!("new image activated: the device reboots into it");
        self.unsubscribe_on_shutdown = false;
        self.queue.clear();
        self.signal(AgentEvent::Shutdown, Data::None);
        Ok(())
    }
}

/// The client token of job request `n`: `"{n}:{thingName}"`, the thing name cut so that the
/// token stays within the API's 64 characters (as the C agent cuts it).
fn client_token(n: u32, thing: &str) -> String {
    let number = n.to_string();
    let room = 64 - number.len() - 1;
    let thing: String = thing.chars().take(room).collect();
    format!("{number}:{thing}")
}

/// The number of the agent's job request a `$next/get` answer carries in its client token
/// (`"{n}:{thingName}"`); `None` for notifications.
fn request_number(payload: &[u8]) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("clientToken")?
        .as_str()?
        .split(':')
        .next()?
        .parse()
        .ok()
}

/// The next GetStream request: from the first missing block, a bitmap window holding up to
/// `per_request` missing blocks. Returns the request and the blocks it asks for.
pub(crate) fn next_request(
    missing: &Bitmap,
    file_id: u32,
    block_size: u32,
    per_request: u64,
) -> (GetStreamRequest, BTreeSet<u64>) {
    let max_window = (MAX_BITMAP_BYTES as u64) * 8;
    let mut wanted = BTreeSet::new();
    let mut first = None;
    for b in missing.missing_blocks() {
        let start = *first.get_or_insert(b);
        if b - start >= max_window || wanted.len() as u64 >= per_request {
            break;
        }
        wanted.insert(b);
    }
    let offset = first.unwrap_or(0);
    let last = wanted.last().copied().unwrap_or(offset);
    let mut bitmap = vec![0u8; usize::try_from((last - offset) / 8 + 1).unwrap_or(1)];
    for b in &wanted {
        let k = b - offset;
        if let Some(byte) = usize::try_from(k / 8).ok().and_then(|i| bitmap.get_mut(i)) {
            *byte |= 1 << (k % 8);
        }
    }
    let req = GetStreamRequest {
        client_token: Some(STREAM_CLIENT_TOKEN.into()),
        stream_version: None,
        file_id: u64::from(file_id),
        block_size: u64::from(block_size),
        offset,
        number_of_blocks: Some(wanted.len() as u64),
        bitmap: Some(bitmap),
    };
    (req, wanted)
}

#[cfg(test)]
mod tests;
