//! Task versions in memory: what the seed has fetched, which peer holds which piece, who is
//! downloading what from whom. One [`Version`] per (task, origin content); [`Tasks`] maps task ids to
//! their current version and version ids to versions (for piece serving and eviction).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use fetcher::location::Location;
use fetcher::piece::PieceMeta;
use fetcher::piece_store::TaskStore;
use fetcher::source::HeaderPair;
use indexmap::IndexMap;
use proto::scheduler::TaskError;
use tokio::sync::{Notify, watch};

pub use crate::peers::{Holders, Parent, PeerKey, PeerKeys, PeerList, Peers, Pieces};

/// What the origin told the seed about the content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub version_id: String,
    pub content_length: i64,
    pub piece_size: u32,
    pub etag: String,
    pub last_modified: String,
}

/// Where the seed is.
#[derive(Clone, Debug)]
pub enum Status {
    /// Waiting for the origin's answer, or streaming from it.
    Seeding,
    /// Every piece is on disk.
    Complete {
        content_length: u64,
        piece_count: u32,
        digest: String,
    },
    /// The origin refused or broke; peers get this error.
    Failed(TaskError),
}

/// Piece numbers (hashed fast: the scheduler looks them up on every decision).
pub type PieceSet = HashSet<u32, foldhash::fast::RandomState>;
/// Piece number → something.
pub type PieceMap<V> = HashMap<u32, V, foldhash::fast::RandomState>;

/// A peer connected to a version.
#[derive(Debug)]
pub struct PeerState {
    /// The peer's id as it registered (what other peers are told their parent is called).
    pub id: String,
    /// The host as the connection shows it (see `scheduler::identity`), not as the peer claims.
    pub host_id: String,
    pub base_url: String,
    pub have: Pieces,
    /// piece → parent, for assignments not yet reported.
    pub outstanding: PieceMap<Parent>,
    /// Its uploads under way (assignments to others naming it as the parent).
    pub load: usize,
    /// Parents that failed this peer: never assigned to it again for this version.
    pub failed_parents: PeerKeys,
    /// Pieces a lazy reader waits on: assigned before any other.
    pub wanted: PieceSet,
    /// Assign wanted pieces only (lazy reader, background fetching off).
    pub only_wanted: bool,
    /// Joined a content-keyed task through another origin than the seed's: gets pieces only
    /// once the seed matched the digest (the seed's origin is not this peer's to trust).
    pub verified_only: bool,
    /// Wakes this peer's session to be scheduled again.
    pub wake: Arc<Notify>,
    /// In [`State::starved`]: its window had room that nothing could fill.
    pub starved: bool,
    /// Where the host says it sits (see [`Site`]).
    pub location: Location,
    /// Isolated for the version ([`State::isolate`]): its holdings no longer count for its site.
    pub isolated: bool,
}

impl PeerState {
    /// A peer `id` that joined holding `have`.
    pub fn new(id: String, host_id: String, base_url: String, have: Pieces) -> Self {
        Self {
            id,
            host_id,
            base_url,
            have,
            outstanding: PieceMap::default(),
            load: 0,
            failed_parents: PeerKeys::default(),
            wanted: PieceSet::default(),
            only_wanted: false,
            verified_only: false,
            wake: Arc::new(Notify::new()),
            starved: false,
            location: Location::default(),
            isolated: false,
        }
    }
}

/// What the scheduler keeps per location: the peers there with a free upload slot, and per piece
/// how many usable peers there hold it and how many copies are on their way to it (a piece
/// enters a location from outside only while it has neither; see `scheduler::assign`).
#[derive(Debug, Default)]
pub struct Site {
    pub peers: usize,
    pub free: PeerList,
    pub holders: PieceMap<usize>,
    pub in_flight: PieceMap<usize>,
}

impl Site {
    /// Whether the location has no usable copy of piece `n` and none on its way.
    pub fn lacks(&self, n: u32) -> bool {
        self.holders.get(&n).is_none_or(|c| *c == 0)
            && self.in_flight.get(&n).is_none_or(|c| *c == 0)
    }
}

/// `map[n] -= 1`, dropping the entry at zero.
fn decrement(map: &mut PieceMap<usize>, n: u32) {
    if let Some(c) = map.get_mut(&n) {
        *c = c.saturating_sub(1);
        if *c == 0 {
            map.remove(&n);
        }
    }
}

/// Mutable state of a version (under one mutex; never held across an await).
#[derive(Debug)]
pub struct State {
    pub info: Option<Info>,
    pub status: Status,
    /// Known pieces, in order (piece `n` at index `n`): the seed holds them, but for
    /// `seed_lacks`.
    pub pieces: Vec<PieceMeta>,
    /// Known pieces the seed does not hold yet: a version taken over from a failed supernode
    /// (`crate::rebuild`) knows every piece's metadata before it gets the bytes from peers.
    pub seed_lacks: PieceSet,
    pub peers: Peers<PeerState>,
    /// The supernode's uploads under way.
    pub supernode_load: usize,
    /// Outstanding assignments per piece.
    pub in_flight: PieceMap<usize>,
    /// Piece → the peers holding it (kept with [`State::add_peer`], [`State::hold`] and
    /// [`State::remove_peer`]): parents are looked for among a piece's holders, not among all
    /// peers.
    pub holders: PieceMap<Holders>,
    /// Sessions waiting for something to assign them, oldest first (see [`State::wake_starved`]).
    pub starved: VecDeque<PeerKey>,
    /// Per location: peers with a free upload slot (parents are looked for among them), holders
    /// and copies on their way (see `scheduler::assign`).
    pub sites: IndexMap<Location, Site>,
    /// Ids of the parents taken out of scheduling for this version (a parent that joins again
    /// under the same id stays out).
    pub bad_parents: HashSet<String>,
    /// Parent id → hosts that reported it for bad data or unreachability.
    pub fault_reporters: HashMap<String, HashSet<String>>,
    /// Fingerprints of header sets the origin accepted for this version.
    pub validated: HashSet<String>,
    pub last_access: Instant,
    pub last_validated: Instant,
}

impl State {
    /// Adds a peer and its holdings; its key.
    pub fn add_peer(&mut self, mut peer: PeerState) -> PeerKey {
        peer.isolated = self.bad_parents.contains(&peer.id);
        let (location, isolated, have) = (peer.location.clone(), peer.isolated, peer.have.clone());
        let key = self.peers.insert(peer);
        let site = self.sites.entry(location).or_default();
        site.peers += 1;
        site.free.insert(key);
        for n in have.iter() {
            if !isolated {
                *site.holders.entry(n).or_default() += 1;
            }
            self.holders.entry(n).or_default().insert(key);
        }
        key
    }

    /// Peer `key` now holds piece `n`; whether that is news.
    pub fn hold(&mut self, key: PeerKey, n: u32) -> bool {
        let Some(p) = self.peers.get_mut(&key) else {
            return false;
        };
        if !p.have.insert(n) {
            return false;
        }
        if !p.isolated
            && let Some(site) = self.sites.get_mut(&p.location)
        {
            *site.holders.entry(n).or_default() += 1;
        }
        self.holders.entry(n).or_default().insert(key);
        true
    }

    /// Removes peer `key` (it left) from the peers, the holder sets and its site.
    pub fn remove_peer(&mut self, key: PeerKey) -> Option<PeerState> {
        let p = self.peers.remove(&key)?;
        for n in p.have.iter() {
            if let Some(h) = self.holders.get_mut(&n) {
                h.remove(key);
            }
        }
        if let Some(site) = self.sites.get_mut(&p.location) {
            site.peers -= 1;
            site.free.swap_remove(&key);
            if !p.isolated {
                for n in p.have.iter() {
                    decrement(&mut site.holders, n);
                }
            }
            if site.peers == 0 {
                self.sites.swap_remove(&p.location);
            }
        }
        Some(p)
    }

    /// Takes parent `key` out of scheduling for this version; whether it was in.
    pub fn isolate(&mut self, key: PeerKey) -> bool {
        let Some(p) = self.peers.get_mut(&key) else {
            return false;
        };
        self.bad_parents.insert(p.id.clone());
        if std::mem::replace(&mut p.isolated, true) {
            return false;
        }
        if let Some(site) = self.sites.get_mut(&p.location) {
            for n in p.have.iter() {
                decrement(&mut site.holders, n);
            }
        }
        true
    }

    /// Books an assignment of piece `n` to a peer of `location`.
    pub fn send(&mut self, location: &Location, n: u32) {
        *self.in_flight.entry(n).or_default() += 1;
        if let Some(site) = self.sites.get_mut(location) {
            *site.in_flight.entry(n).or_default() += 1;
        }
    }

    /// Books the end of an assignment of piece `n` to a peer of `location` (reported, or the
    /// peer left).
    pub fn unsend(&mut self, location: &Location, n: u32) {
        decrement(&mut self.in_flight, n);
        if let Some(site) = self.sites.get_mut(location) {
            decrement(&mut site.in_flight, n);
        }
    }

    /// Uploads under way from `parent`.
    pub fn load(&self, parent: Parent) -> usize {
        match parent {
            Parent::Supernode => self.supernode_load,
            Parent::Peer(k) => self.peers.get(&k).map_or(0, |p| p.load),
        }
    }

    /// Books an upload from `parent`; a peer at `peer_cap` leaves its site's free set.
    pub fn start_upload(&mut self, parent: Parent, peer_cap: usize) {
        match parent {
            Parent::Supernode => self.supernode_load += 1,
            Parent::Peer(k) => {
                let Some(p) = self.peers.get_mut(&k) else {
                    return;
                };
                p.load += 1;
                if p.load >= peer_cap
                    && let Some(site) = self.sites.get_mut(&p.location)
                {
                    site.free.swap_remove(&k);
                }
            }
        }
    }

    /// Books the end of an upload from `parent` (if it is still there); a peer under `peer_cap`
    /// again is free again.
    pub fn end_upload(&mut self, parent: Parent, peer_cap: usize) {
        match parent {
            Parent::Supernode => self.supernode_load = self.supernode_load.saturating_sub(1),
            Parent::Peer(k) => {
                let Some(p) = self.peers.get_mut(&k) else {
                    return;
                };
                p.load = p.load.saturating_sub(1);
                if p.load < peer_cap
                    && let Some(site) = self.sites.get_mut(&p.location)
                {
                    site.free.insert(k);
                }
            }
        }
    }

    /// Peer `key` could not fill its window: it waits in line for the next change that may help.
    pub fn starve(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key)
            && !p.starved
        {
            p.starved = true;
            self.starved.push_back(key);
        }
    }

    /// Wakes up to `n` starved sessions, oldest first (a change freed a slot or added a holder:
    /// only so many peers can use it).
    pub fn wake_starved(&mut self, n: usize) {
        self.wake_starved_if(n, |_, _| true);
    }

    /// Wakes up to `n` starved sessions, oldest first, among those `helps` says the change can
    /// serve (they lack a piece it offers); the others keep waiting. Looks at a bounded number
    /// of them, so a change costs the same however many peers wait.
    pub fn wake_starved_if(&mut self, n: usize, helps: impl Fn(&State, &PeerState) -> bool) {
        if n == 0 {
            return;
        }
        let look = n.saturating_mul(16).min(self.starved.len());
        let seen: Vec<PeerKey> = self.starved.drain(..look).collect();
        let mut wake = Vec::new();
        let mut keep = Vec::new();
        for key in seen {
            match self.peers.get(&key) {
                Some(p) if p.starved && wake.len() < n && helps(self, p) => wake.push(key),
                Some(p) if p.starved => keep.push(key),
                _ => {} // left, or woken since
            }
        }
        for key in &wake {
            if let Some(p) = self.peers.get_mut(key) {
                p.starved = false;
                p.wake.notify_one();
            }
        }
        // The ones passed over keep their place ahead of those behind them.
        for key in keep.into_iter().rev() {
            self.starved.push_front(key);
        }
    }

    /// Whether `peer` lacks (and is not fetching) piece `n`.
    pub fn lacks(peer: &PeerState, n: u32) -> bool {
        !peer.have.contains(n) && !peer.outstanding.contains_key(&n)
    }

    /// The key of the connected peer registered as `id` (tests name peers; the scheduler
    /// holds keys).
    #[cfg(test)]
    pub fn key(&self, id: &str) -> PeerKey {
        self.peers
            .iter()
            .find(|(_, p)| p.id == id)
            .map_or(PeerKey::NOBODY, |(k, _)| k)
    }
}

/// One version of a task.
#[derive(Debug)]
pub struct Version {
    pub task_id: String,
    pub url: String,
    /// Headers of the registration that started the seed (used for the origin fetch).
    pub headers: Vec<HeaderPair>,
    /// `sha256:<hex>` the content must have (content-keyed tasks such as registry blobs).
    pub expected_digest: Option<String>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    /// The seed's store, once the origin answered.
    pub store: OnceLock<Arc<TaskStore>>,
}

impl Version {
    /// A new version about to be seeded with `headers` (whose fingerprint counts as validated once
    /// the origin accepts the seed's request).
    pub fn new(
        task_id: String,
        url: String,
        headers: Vec<HeaderPair>,
        expected_digest: Option<String>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let mut validated = HashSet::new();
        let key = expected_digest.as_ref().map(|_| url_key(&url));
        validated.insert(fingerprint(key.as_deref(), &headers));
        Arc::new(Self {
            task_id,
            url,
            headers,
            expected_digest,
            state: Mutex::new(State {
                info: None,
                status: Status::Seeding,
                pieces: Vec::new(),
                seed_lacks: PieceSet::default(),
                peers: Peers::default(),
                supernode_load: 0,
                holders: PieceMap::default(),
                starved: VecDeque::new(),
                sites: IndexMap::new(),
                in_flight: PieceMap::default(),
                bad_parents: HashSet::new(),
                fault_reporters: HashMap::new(),
                validated,
                last_access: now,
                last_validated: now,
            }),
            changed: watch::channel(0).0,
            store: OnceLock::new(),
        })
    }

    /// Locks the state (a poisoned lock is recovered: the state stays consistent per operation).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every session and waiter of this version: for what all of them must see (the
    /// origin's answer, the first piece, completion, failure). Scheduling changes wake only the
    /// sessions they can help ([`State::wake_starved`]).
    pub fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that sees every [`Version::notify`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The version id, once known.
    pub fn version_id(&self) -> Option<String> {
        self.lock().info.as_ref().map(|i| i.version_id.clone())
    }

    /// A version with `pieces` known pieces of 4 bytes each (tests of the scheduling policy).
    #[cfg(test)]
    pub fn with_pieces(pieces: u32) -> Arc<Self> {
        let v = Self::new("t".repeat(64), "http://o/x".into(), vec![], None);
        v.lock().pieces = (0..pieces)
            .map(|n| PieceMeta {
                num: n,
                offset: u64::from(n) * 4,
                size: 4,
                sha256: String::new(),
            })
            .collect();
        v
    }

    /// True when the seed failed.
    pub fn failed(&self) -> bool {
        matches!(self.lock().status, Status::Failed(_))
    }
}

/// Where a URL points, without its query (signed-URL parameters vary per request): the origin a
/// content-keyed task's bytes came from, as far as access is concerned.
pub fn url_key(url: &str) -> String {
    fetcher::source::redact(url)
}

/// Fingerprint of a header set (order- and case-insensitive names), and for content-keyed tasks
/// of the URL they were sent to (credentials accepted by one origin say nothing of another).
pub fn fingerprint(url_key: Option<&str>, headers: &[HeaderPair]) -> String {
    use sha2::{Digest, Sha256};
    let mut v: Vec<(String, &str)> = headers
        .iter()
        .map(|(n, val)| (n.to_ascii_lowercase(), val.as_str()))
        .collect();
    v.sort();
    let mut h = Sha256::new();
    if let Some(u) = url_key {
        h.update(b"url\0");
        h.update(u.as_bytes());
        h.update(b"\0");
    }
    for (n, val) in v {
        h.update(n.as_bytes());
        h.update(b"\0");
        h.update(val.as_bytes());
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

/// All versions in memory.
#[derive(Debug, Default)]
pub struct Tasks {
    /// task id → current version.
    current: Mutex<HashMap<String, Arc<Version>>>,
    /// version id → version (every version with a store).
    by_version: Mutex<HashMap<String, Arc<Version>>>,
}

impl Tasks {
    /// The current version of a task.
    pub fn current(&self, task_id: &str) -> Option<Arc<Version>> {
        self.current
            .lock()
            .ok()
            .and_then(|m| m.get(task_id).cloned())
    }

    /// Makes `v` the current version of its task (returns the one it replaced).
    pub fn set_current(&self, v: Arc<Version>) -> Option<Arc<Version>> {
        self.current
            .lock()
            .ok()
            .and_then(|mut m| m.insert(v.task_id.clone(), v))
    }

    /// Runs `f` with the map of current versions locked (atomic get-or-create).
    pub fn with_current<R>(&self, f: impl FnOnce(&mut HashMap<String, Arc<Version>>) -> R) -> R {
        let mut m = self.current.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut m)
    }

    /// Indexes `v` under its version id (after its info is known).
    pub fn index(&self, version_id: String, v: Arc<Version>) {
        if let Ok(mut m) = self.by_version.lock() {
            m.insert(version_id, v);
        }
    }

    /// A version by id.
    pub fn by_version(&self, version_id: &str) -> Option<Arc<Version>> {
        self.by_version
            .lock()
            .ok()
            .and_then(|m| m.get(version_id).cloned())
    }

    /// Every indexed version.
    pub fn versions(&self) -> Vec<(String, Arc<Version>)> {
        self.by_version
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Forgets a version (eviction or failure).
    pub fn forget(&self, version_id: &str, task_id: &str) {
        if let Ok(mut m) = self.by_version.lock() {
            m.remove(version_id);
        }
        if let Ok(mut m) = self.current.lock()
            && m.get(task_id).and_then(|v| v.version_id()).as_deref() == Some(version_id)
        {
            m.remove(task_id);
        }
    }

    /// Number of versions in memory.
    pub fn len(&self) -> usize {
        self.by_version.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when no version is in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
