//! Running the agent and talking to it: [`init`] (`OTA_Init`) builds an [`Agent`] and its
//! [`AgentHandle`]; [`Agent::run`] is the event-processing task
//! (`OTA_EventProcessingTask`); the handle is everything else of the interface — get state,
//! check for update, suspend, resume, signal event, activate, set/get image state,
//! statistics, shutdown — and the entry point for incoming MQTT publishes
//! ([`AgentHandle::incoming`]), which is how the agent shares the application's connection.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use updraft_protocol::topics::Format;

use crate::agent::{Agent, AgentConfig, Callback, Data, Statistics};
use crate::error::{Error, OsError, OtaError};
use crate::http::{Fetch, Sink};
use crate::mqtt::{Inbound, MqttClient, classify};
use crate::pal::{ImageState, Pal};
use crate::resume::ResumeStore;
use crate::state::{AgentEvent, AgentState};
use crate::verify::CertificateStore;

/// What the handle sends to the agent's task.
pub(crate) enum Command {
    Signal(AgentEvent, Data),
    CheckForUpdate,
    JobDocument(Bytes),
    FileBlock {
        stream: String,
        format: Format,
        payload: Bytes,
    },
    StreamRejected {
        stream: String,
        format: Format,
        payload: Bytes,
    },
    /// A block fetched over HTTP for transfer number `transfer`.
    HttpBlock {
        transfer: u64,
        block_id: u64,
        payload: Bytes,
    },
    /// An HTTP fetch failed after its retries.
    HttpFailed {
        transfer: u64,
        status: Option<u16>,
        detail: String,
    },
    /// The application's status for a custom (non-OTA) job.
    CustomJobStatus {
        job_id: String,
        status: crate::status::CustomJobStatus,
        details: std::collections::BTreeMap<String, String>,
    },
    SetImageState(ImageState, oneshot::Sender<Result<(), Error>>),
    Activate(oneshot::Sender<Result<(), Error>>),
    Shutdown {
        unsubscribe: bool,
    },
}

/// A file block on its way to the agent: a Streams message, or a block fetched over HTTP.
pub(crate) enum Block {
    Mqtt {
        stream: String,
        format: Format,
        payload: Bytes,
    },
    Http {
        transfer: u64,
        block_id: u64,
        payload: Bytes,
    },
}

impl From<Block> for Command {
    fn from(b: Block) -> Command {
        match b {
            Block::Mqtt {
                stream,
                format,
                payload,
            } => Command::FileBlock {
                stream,
                format,
                payload,
            },
            Block::Http {
                transfer,
                block_id,
                payload,
            } => Command::HttpBlock {
                transfer,
                block_id,
                payload,
            },
        }
    }
}

/// The agent's ends of its two queues: control (unbounded: job documents and API calls are
/// never dropped) and blocks (bounded: a block arriving when it is full is dropped, counted,
/// and asked for again).
pub(crate) struct Receivers {
    pub control: mpsc::UnboundedReceiver<Command>,
    pub blocks: mpsc::Receiver<Block>,
    /// The HTTP fetcher's requests, its way back, and its TLS configuration: the fetcher
    /// task is started by [`Agent::run`].
    pub fetches: mpsc::UnboundedReceiver<Fetch>,
    pub sink: Sink,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// State the agent publishes for the handle to read without a round trip.
pub(crate) struct Shared {
    state: watch::Sender<AgentState>,
    pub(crate) image_state: AtomicU8,
    pub(crate) received: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

impl Shared {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_state(&self, s: AgentState) {
        self.state.send_replace(s);
    }

    pub(crate) fn new() -> (Shared, watch::Receiver<AgentState>) {
        let (state, rx) = watch::channel(AgentState::Init);
        let shared = Shared {
            state,
            image_state: AtomicU8::new(ImageState::Unknown as u8),
            received: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        (shared, rx)
    }

    pub(crate) fn reset_statistics(&self) {
        for c in [&self.received, &self.queued, &self.processed, &self.dropped] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Builds the agent (`OTA_Init`): configuration with the thing name, the platform, where
/// checkpoints go, where certificates come from, the MQTT connection to use and the
/// application's callback. Nothing happens until [`Agent::run`] is polled.
pub fn init(
    config: AgentConfig,
    pal: impl Pal + 'static,
    store: impl ResumeStore + 'static,
    certs: impl CertificateStore + 'static,
    mqtt: impl MqttClient + 'static,
    callback: impl FnMut(crate::JobEvent) + Send + 'static,
) -> Result<(Agent, AgentHandle), Error> {
    config.validate()?;
    let tls = match &config.http_ca_pem {
        Some(pem) => Some(
            crate::http::tls_config(pem)
                .map_err(|e| Error::agent(OtaError::InvalidArg, format!("http_ca_pem: {e}")))?,
        ),
        None => None,
    };
    let (tx, control) = mpsc::unbounded_channel();
    let (blocks_tx, blocks) = mpsc::channel(config.event_queue_size);
    let (fetch_tx, fetches) = mpsc::unbounded_channel();
    let (shared, state_rx) = Shared::new();
    let shared = Arc::new(shared);
    let sink = Sink {
        blocks: blocks_tx.downgrade(),
        control: tx.downgrade(),
        shared: shared.clone(),
    };
    let handle = AgentHandle {
        tx,
        blocks: blocks_tx,
        shared: shared.clone(),
        state: state_rx,
        thing_name: Arc::from(config.thing_name.as_str()),
    };
    let callback: Callback = Box::new(callback);
    let agent = Agent::new(
        config,
        Box::new(pal),
        Box::new(store),
        Box::new(certs),
        Box::new(mqtt),
        callback,
        shared,
        fetch_tx,
        Receivers {
            control,
            blocks,
            fetches,
            sink,
            tls,
        },
    );
    Ok((agent, handle))
}

impl Agent {
    /// The event loop (`OTA_EventProcessingTask`): starts the agent, then processes
    /// commands and timers until the agent stops (shutdown, activation, reset) or every
    /// handle is dropped.
    pub async fn run(mut self) {
        let Some(rx) = self.rx.take() else {
            return;
        };
        let Receivers {
            mut control,
            mut blocks,
            fetches,
            sink,
            tls,
        } = rx;
        // The HTTP fetcher lives as long as the agent: it ends when the agent drops its
        // request sender, and is cut short if it is still busy then.
        let fetcher = tokio::spawn(crate::http::fetcher(
            fetches,
            sink,
            tls,
            self.config.request_wait,
        ));
        self.start(Instant::now());
        while self.state() != AgentState::Stopped {
            let deadline = self.next_deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                cmd = control.recv() => match cmd {
                    Some(cmd) => self.command(cmd, Instant::now()),
                    None => {
                        debug!("every handle was dropped: shutting down");
                        self.command(Command::Shutdown { unsubscribe: true }, Instant::now());
                    }
                },
                Some(b) = blocks.recv() => self.command(b.into(), Instant::now()),
                () = timer => self.on_timers(Instant::now()),
            }
        }
        fetcher.abort();
    }
}

/// The application's side of the agent. Cheap to clone; every method is safe to call from
/// any task (the async ones wait for the agent's answer, so not from inside the callback).
#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::UnboundedSender<Command>,
    blocks: mpsc::Sender<Block>,
    shared: Arc<Shared>,
    state: watch::Receiver<AgentState>,
    thing_name: Arc<str>,
}

impl AgentHandle {
    fn send(&self, cmd: Command) -> Result<(), Error> {
        self.tx
            .send(cmd)
            .map_err(|_| Error::os(OsError::EventQueueReceiveFailed, "the agent has stopped"))
    }

    /// Hands an incoming publish to the agent. Returns `true` when the topic is one of the
    /// agent's kind (jobs or streams topics of its thing) — the application may still look at
    /// it, e.g. `notify-next` if it also runs jobs of its own — and `false` for the rest.
    /// Never blocks: a block arriving with the queue full is dropped (and requested again).
    pub fn incoming(&self, topic: &str, payload: &[u8]) -> bool {
        self.incoming_bytes(topic, Bytes::copy_from_slice(payload))
    }

    /// [`AgentHandle::incoming`] without copying the payload.
    pub fn incoming_bytes(&self, topic: &str, payload: Bytes) -> bool {
        let Some(kind) = classify(&self.thing_name, topic) else {
            return false;
        };
        let cmd = match kind {
            Inbound::JobDocument => Command::JobDocument(payload),
            Inbound::FileBlock { stream, format } => {
                Shared::bump(&self.shared.received);
                match self.blocks.try_send(Block::Mqtt {
                    stream,
                    format,
                    payload,
                }) {
                    Ok(()) => Shared::bump(&self.shared.queued),
                    Err(_) => Shared::bump(&self.shared.dropped),
                }
                return true;
            }
            Inbound::StreamRejected { stream, format } => Command::StreamRejected {
                stream,
                format,
                payload,
            },
            Inbound::JobRejected => {
                warn!(
                    "the service refused the job request: {}",
                    String::from_utf8_lossy(&payload)
                );
                return true;
            }
            Inbound::OtherJobs => return true,
        };
        if let Err(e) = self.send(cmd) {
            warn!("incoming message dropped: {e}");
        }
        true
    }

    /// The agent's state (`OTA_GetState`).
    pub fn state(&self) -> AgentState {
        *self.state.borrow()
    }

    /// Waits until the agent is in `state` (or has stopped).
    pub async fn wait_for(&self, state: AgentState) -> AgentState {
        let mut rx = self.state.clone();
        match rx
            .wait_for(|s| *s == state || *s == AgentState::Stopped)
            .await
        {
            Ok(s) => *s,
            Err(_) => AgentState::Stopped,
        }
    }

    /// The image state of the current job as the agent last set it (`OTA_GetImageState`).
    pub fn image_state(&self) -> ImageState {
        ImageState::from_u8(self.shared.image_state.load(Ordering::Relaxed))
            .unwrap_or(ImageState::Unknown)
    }

    /// Block message counters (`OTA_GetStatistics`).
    pub fn statistics(&self) -> Statistics {
        Statistics {
            packets_received: self.shared.received.load(Ordering::Relaxed),
            packets_queued: self.shared.queued.load(Ordering::Relaxed),
            packets_processed: self.shared.processed.load(Ordering::Relaxed),
            packets_dropped: self.shared.dropped.load(Ordering::Relaxed),
        }
    }

    /// Queues an event for the state machine (`OTA_SignalEvent`).
    pub fn signal_event(&self, event: AgentEvent) -> Result<(), Error> {
        self.send(Command::Signal(event, Data::None))
    }

    /// Asks the service for the next job now (`OTA_CheckForUpdate`).
    pub fn check_for_update(&self) -> Result<(), Error> {
        self.send(Command::CheckForUpdate)
    }

    /// Suspends all agent operations (`OTA_Suspend`); progress is checkpointed.
    pub fn suspend(&self) -> Result<(), Error> {
        self.signal_event(AgentEvent::Suspend)
    }

    /// Resumes after [`AgentHandle::suspend`] (`OTA_Resume`): asks for the job again and
    /// continues its download where it stopped.
    pub fn resume(&self) -> Result<(), Error> {
        self.signal_event(AgentEvent::Resume)
    }

    /// Stops the agent (`OTA_Shutdown`), optionally unsubscribing from its topics.
    pub fn shutdown(&self, unsubscribe: bool) -> Result<(), Error> {
        self.send(Command::Shutdown { unsubscribe })
    }

    /// Waits until the agent has stopped.
    pub async fn stopped(&self) {
        self.wait_for(AgentState::Stopped).await;
    }

    /// Sets the image state (`OTA_SetImageState`): during a self-test, Accepted commits the
    /// image and reports SUCCEEDED; Rejected reports FAILED and resets into the previous image;
    /// Aborted aborts the active job.
    pub async fn set_image_state(&self, state: ImageState) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetImageState(state, tx))?;
        rx.await
            .map_err(|_| Error::os(OsError::EventQueueReceiveFailed, "the agent has stopped"))?
    }

    /// Activates the received image (`OTA_ActivateNewImage`); on a device this reboots into
    /// it. The agent stops.
    pub async fn activate_new_image(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Activate(tx))?;
        rx.await
            .map_err(|_| Error::os(OsError::EventQueueReceiveFailed, "the agent has stopped"))?
    }

    /// Reports the status of a custom job (one the agent handed over with
    /// [`crate::JobEvent::ParseCustomJob`]). A terminal status ends it for this device, and
    /// the agent asks for the next job: an application that does not run custom jobs
    /// reports them `Rejected`, so that they do not hold up the OTA jobs queued behind them.
    pub fn report_custom_job(
        &self,
        job_id: &str,
        status: crate::status::CustomJobStatus,
        details: std::collections::BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.send(Command::CustomJobStatus {
            job_id: job_id.to_owned(),
            status,
            details,
        })
    }

    /// The thing name the agent serves.
    pub fn thing_name(&self) -> &str {
        &self.thing_name
    }
}
