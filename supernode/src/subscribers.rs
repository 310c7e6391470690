//! Host agents subscribed to this supernode (`Scheduler.Subscribe`): each holds one stream open
//! for as long as both run, so the supernode can give it work of its own accord: fetch a registry
//! blob whole into the agent's store (a preheat job of scope `all_peers`). An agent proves it
//! belongs to the cluster with its certificate before it hears anything: commands carry
//! registry credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use proto::scheduler::{HostCommand, HostReport};
use tokio::sync::mpsc;

/// Subscribed agents at most (beyond it, new subscriptions are refused).
pub const MAX_SUBSCRIBERS: usize = 100_000;
/// Commands queued per agent at most.
const QUEUE: usize = 256;

/// One subscribed agent.
struct Subscriber {
    hostname: String,
    ip: String,
    commands: mpsc::Sender<HostCommand>,
}

/// What an agent said of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostOutcome {
    pub hostname: String,
    pub ip: String,
    pub url: String,
    /// `Err(why)` when the agent failed it, or never answered.
    pub result: Result<(), String>,
}

/// Reports of a job in progress: where its outcomes go.
type Waiter = mpsc::UnboundedSender<(u64, HostReport)>;

pub struct Subscribers {
    next: AtomicU64,
    agents: Mutex<HashMap<u64, Subscriber>>,
    /// Jobs waiting for reports, by job id.
    waiting: Mutex<HashMap<u64, Waiter>>,
    /// `damselfly_supernode_subscribed_agents`.
    gauge: prometheus::IntGauge,
}

impl Subscribers {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            next: AtomicU64::new(0),
            agents: Mutex::default(),
            waiting: Mutex::default(),
            gauge,
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Agents subscribed now.
    pub fn len(&self) -> usize {
        self.agents().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serves one subscription: `inbound` is the agent's reports (its hello first), the returned
    /// receiver the commands for it. `None` when the table is full.
    pub fn subscribe(
        self: &std::sync::Arc<Self>,
        ip: String,
        mut inbound: impl futures::Stream<Item = Result<HostReport, tonic::Status>>
        + Send
        + Unpin
        + 'static,
    ) -> Option<mpsc::Receiver<HostCommand>> {
        if self.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            // The hello names the host; until then it is not given work.
            let hello = tokio::time::timeout(Duration::from_secs(10), inbound.next()).await;
            let Ok(Some(Ok(hello))) = hello else {
                return;
            };
            let hostname: String = hello.hostname.chars().take(253).collect();
            tracing::info!(host = %hostname, %ip, "agent subscribed");
            this.agents().insert(
                id,
                Subscriber {
                    hostname,
                    ip,
                    commands: tx,
                },
            );
            this.gauge.inc();
            while let Some(Ok(report)) = inbound.next().await {
                let waiter = this.waiting().get(&report.job).cloned();
                if let Some(w) = waiter {
                    let _ = w.send((id, report));
                }
            }
            let gone = this.agents().remove(&id);
            if let Some(s) = gone {
                this.gauge.dec();
                tracing::info!(host = %s.hostname, "agent unsubscribed");
            }
        });
        Some(rx)
    }

    /// Sends every subscribed agent the commands (one per blob) of job `job` and waits for all
    /// their reports, or until `deadline` (an agent that did not answer by then, or left, failed).
    pub async fn fan_out(
        &self,
        job: u64,
        commands: &[HostCommand],
        deadline: Duration,
    ) -> Vec<HostOutcome> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting().insert(job, tx);
        let targets: Vec<(u64, String, String, mpsc::Sender<HostCommand>)> = self
            .agents()
            .iter()
            .map(|(id, s)| (*id, s.hostname.clone(), s.ip.clone(), s.commands.clone()))
            .collect();
        let mut pending: HashMap<(u64, String), (String, String)> = HashMap::new();
        let mut out = Vec::new();
        for (id, hostname, ip, sender) in &targets {
            for c in commands {
                let outcome = |result| HostOutcome {
                    hostname: hostname.clone(),
                    ip: ip.clone(),
                    url: c.url.clone(),
                    result,
                };
                match sender.try_send(c.clone()) {
                    Ok(()) => {
                        pending.insert((*id, c.url.clone()), (hostname.clone(), ip.clone()));
                    }
                    Err(_) => out.push(outcome(Err("the agent's command queue is full".into()))),
                }
            }
        }
        let wait = async {
            while !pending.is_empty() {
                let Some((id, r)) = rx.recv().await else {
                    break;
                };
                if let Some((hostname, ip)) = pending.remove(&(id, r.url.clone())) {
                    let result = if r.ok { Ok(()) } else { Err(r.error) };
                    out.push(HostOutcome {
                        hostname,
                        ip,
                        url: r.url,
                        result,
                    });
                }
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.waiting().remove(&job);
        for ((_, url), (hostname, ip)) in pending {
            out.push(HostOutcome {
                hostname,
                ip,
                url,
                result: Err("the agent did not report in time".into()),
            });
        }
        out
    }
}
