//! IPAM simulation in the spirit of Weave Net's allocator fuzz test
//! (DESIGN.md "How ovl is tested"): 3–6 hosts, thousands of random
//! allocate / allocate-exact / free / release / donate / gossip / crash /
//! leave / die / join / reclaim operations, with every message through a
//! simulated network that loses, duplicates and reorders, under partitions.
//!
//! Persistence is modelled as the agent must do it: every write is
//! serialised before its effect (a donor's snapshot holds the donation
//! before the grant is queued, a recipient persists on accept); merges of
//! gossip are persisted only sometimes. A crash restores the last snapshot.
//!
//! After every step: no address is owned by two hosts according to those
//! hosts' own rings (down hosts count with the snapshot they will restart
//! from), and no address is held twice. At the end: after healing and
//! quiescent gossip all replicas are equal; after the operator reclaims the
//! departed hosts every block belongs to a present host; and filling the
//! pool through donations allocates every usable address exactly once.
//!
//! `IPAM_SIM_SEED=<n>` runs one seed, `IPAM_SIM_SEEDS=<n>` seeds 1..=n (a
//! soak), `IPAM_SIM_STEPS=<n>` changes the length. A failure prints the
//! seed and the last actions.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use ovl_agent::ids::{EndpointId, NetworkId, NodeId};
use ovl_agent::ipam::{
    AcceptError, AllocError, Allocator, DonationRequest, Grant, HandOffError, MergeReport, Pool,
    Ring, Signer, Want, check_converged, check_disjoint, check_unique_addresses,
};
use ring::signature::Ed25519KeyPair;

const SEEDS: u64 = 20;
const STEPS: usize = 5_000;
const MIN_HOSTS: usize = 3;
const MAX_HOSTS: usize = 6;
/// In-flight messages beyond this are dropped (a full socket buffer).
const NET_CAPACITY: usize = 300;
/// Ticks a freed address stays quarantined in the random phase.
const QUARANTINE_TICKS: u64 = 40;

/// splitmix64: small, seedable, good enough for a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len())])
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Status {
    Up,
    /// Crashed; `state` is what it restarts with (its last snapshot).
    Down,
    /// Handed off its space, waits for the ack of hand-off `seq`.
    Leaving {
        to: NodeId,
        seq: u32,
    },
}

struct Host {
    id: NodeId,
    /// Its identity key (not part of any snapshot).
    signer: Signer,
    state: Allocator,
    /// What is on disk: a crash restores it through JSON.
    disk: Allocator,
    status: Status,
    group: u8,
    /// Fingerprint of the state last self-checked (skip unchanged hosts).
    checked: Option<(u128, usize, usize)>,
}

impl Host {
    fn fingerprint(&self) -> (u128, usize, usize) {
        let s = &self.state;
        (
            s.ring().progress(),
            s.allocations().len(),
            s.quarantined().len(),
        )
    }

    fn persist(&mut self) {
        self.disk = self.state.clone();
    }
}

/// Through the wire format and back, as a peer would receive it.
fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(t: &T) -> T {
    let bytes = serde_json::to_vec(t).expect("serialises");
    serde_json::from_slice(&bytes).expect("deserialises")
}

#[derive(Clone)]
enum Body {
    Request(DonationRequest),
    Grant(Grant),
    Gossip(Ring),
    /// The leaving host's whole ring (carries every hand-off it wrote).
    HandOff(Ring, u32),
    HandOffAck(u32),
}

#[derive(Clone)]
struct Msg {
    from: NodeId,
    to: NodeId,
    body: Body,
}

#[derive(Default, Debug)]
struct Stats {
    allocated: u64,
    need_donation: u64,
    exhausted: u64,
    exact_ok: u64,
    freed: u64,
    donations: u64,
    refused_donations: u64,
    grants_accepted: u64,
    merges: u64,
    lost: u64,
    duplicated: u64,
    crashes: u64,
    leaves: u64,
    deaths: u64,
    joins: u64,
    reclaims: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    pool: Pool,
    hosts: Vec<Host>,
    /// Left or died; may still own blocks in replicas until reclaimed.
    departed: Vec<NodeId>,
    /// Every host that ever left or died (the cluster's "departed": their
    /// space may be moved by anyone's signed write).
    gone: Vec<NodeId>,
    net: Vec<Msg>,
    tick: u64,
    next_ep: u32,
    next_id: u32,
    trace: VecDeque<String>,
    stats: Stats,
    /// False while healing: the network delivers everything, nobody crashes.
    chaos: bool,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "ipam_sim FAILED: seed {} at tick {} (rerun: IPAM_SIM_SEED={}); last actions:",
                self.seed, self.tick, self.seed
            );
            for t in &self.trace {
                eprintln!("  {t}");
            }
        }
    }
}

/// Host `n`'s key (deterministic per seed run), bound to the network.
fn signer(n: u32) -> Signer {
    let mut seed = [0x5au8; 32];
    seed[..4].copy_from_slice(&n.to_be_bytes());
    let key = Ed25519KeyPair::from_seed_unchecked(&seed).expect("32-byte seed");
    Signer::new(Arc::new(key), NetworkId::from_bytes([9; 16]))
}

/// The view `from` published, merged by `state`; refusals of whole views
/// are bugs in the simulation (no host lies).
fn merge(state: &mut Allocator, from: NodeId, ring: &Ring, gone: &[NodeId]) -> MergeReport {
    let rep = state.merge_views(&[(from, ring)], &|n| gone.contains(&n));
    if let Some((p, e)) = rep.errors.first() {
        panic!("{} refused the view of {p}: {e}", state.me());
    }
    assert!(
        rep.forged.is_empty(),
        "honest writes refused as forged: {rep:?}"
    );
    rep
}

fn random_pool(rng: &mut Rng) -> Pool {
    let prefix = 24 + rng.below(4) as u8; // /24 .. /27
    let base = Ipv4Addr::new(198, 18, 0, 0);
    let subnet = Ipv4Network::new(base, prefix).expect("prefix");
    let ip_range = rng.percent(30).then(|| {
        let p = prefix + 1 + rng.below(2) as u8;
        let slots = 1u32 << (p - prefix);
        let size = 1u32 << (32 - p);
        let start = u32::from(base) + size * rng.below(slots as usize) as u32;
        Ipv4Network::new(Ipv4Addr::from(start), p).expect("prefix")
    });
    let gateway = rng.percent(80).then(|| Ipv4Addr::from(u32::from(base) + 1));
    Pool::new(subnet, ip_range, gateway).expect("valid pool")
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let pool = random_pool(&mut rng);
        let mut sim = Self {
            seed,
            rng,
            pool: pool.clone(),
            hosts: Vec::new(),
            departed: Vec::new(),
            gone: Vec::new(),
            net: Vec::new(),
            tick: 0,
            next_ep: 0,
            next_id: 1,
            trace: VecDeque::new(),
            stats: Stats::default(),
            chaos: true,
        };
        let creator = sim.new_signer();
        sim.add_host(Allocator::create(creator, pool), 0);
        let extra = MIN_HOSTS - 1 + sim.rng.below(MAX_HOSTS - MIN_HOSTS + 1);
        for _ in 0..extra {
            sim.join();
        }
        sim
    }

    fn new_signer(&mut self) -> Signer {
        self.next_id += 1;
        signer(self.next_id)
    }

    fn new_ep(&mut self) -> EndpointId {
        self.next_ep += 1;
        let mut b = [0xeeu8; 16];
        b[12..].copy_from_slice(&self.next_ep.to_be_bytes());
        EndpointId::from_bytes(b)
    }

    fn log(&mut self, s: String) {
        if self.trace.len() == 40 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t{} {s}", self.tick));
    }

    fn add_host(&mut self, state: Allocator, group: u8) {
        self.hosts.push(Host {
            id: state.me(),
            signer: signer(self.next_id),
            disk: state.clone(),
            state,
            status: Status::Up,
            group,
            checked: None,
        });
    }

    fn idx(&self, id: NodeId) -> Option<usize> {
        self.hosts.iter().position(|h| h.id == id)
    }

    fn with_status(&self, f: impl Fn(&Status) -> bool) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|i| f(&self.hosts[*i].status))
            .collect()
    }

    fn handoff_targets(&self) -> Vec<NodeId> {
        self.hosts
            .iter()
            .filter_map(|h| match h.status {
                Status::Leaving { to, .. } => Some(to),
                _ => None,
            })
            .collect()
    }

    fn send(&mut self, from: NodeId, to: NodeId, body: Body) {
        if self.net.len() >= NET_CAPACITY {
            self.stats.lost += 1;
            return;
        }
        // Grants and requests always cross the wire format; rings often
        // enough to exercise their validation without paying for every one.
        let body = match body {
            Body::Request(r) => Body::Request(wire(&r)),
            Body::Grant(g) => Body::Grant(wire(&g)),
            Body::Gossip(r) if self.rng.percent(12) => Body::Gossip(wire(&r)),
            Body::HandOff(r, seq) if self.rng.percent(12) => Body::HandOff(wire(&r), seq),
            other => other,
        };
        self.net.push(Msg { from, to, body });
    }

    // ---- the random phase

    fn step(&mut self) {
        self.tick += 1;
        let roll = self.rng.below(1000);
        match roll {
            0..250 => self.allocate(),
            250..330 => self.allocate_exact(),
            330..480 => self.free(),
            480..520 => self.release(),
            520..770 => {
                for _ in 0..1 + self.rng.below(3) {
                    self.deliver_one();
                }
            }
            770..900 => self.gossip(),
            900..920 => self.repartition(),
            920..940 => self.crash(),
            940..965 => self.restart(),
            965..975 => self.leave(),
            975..980 => self.die(),
            980..992 => self.join(),
            992..996 => self.operator_reclaim(),
            _ => {}
        }
        for i in self.with_status(|s| matches!(s, Status::Leaving { .. })) {
            if self.rng.percent(5) {
                self.send_hand_off(i);
            }
        }
        self.check();
    }

    fn allocate(&mut self) {
        let Some(i) = self.rng.pick(&self.with_status(|s| *s == Status::Up)) else {
            return;
        };
        let ep = self.new_ep();
        let me = self.hosts[i].id;
        match self.hosts[i].state.allocate(ep) {
            Ok(ip) if self.rng.percent(2) => {
                self.log(format!(
                    "{} allocated {ip}, crashed before persisting",
                    me.short()
                ));
                self.crash_host(i);
            }
            Ok(ip) => {
                self.hosts[i].persist();
                self.stats.allocated += 1;
                self.log(format!("{} allocate {ip}", me.short()));
            }
            Err(AllocError::NoRangeOwned) => {}
            Err(AllocError::NeedDonation { candidates }) => {
                self.stats.need_donation += 1;
                let k = self.rng.below(candidates.len().min(2));
                let donor = candidates[k].0;
                self.log(format!(
                    "{} needs space, asks {}",
                    me.short(),
                    donor.short()
                ));
                self.request(me, donor, Want::Half);
            }
            Err(AllocError::Exhausted) => self.stats.exhausted += 1,
            Err(e) => panic!("allocate on {me}: unexpected {e}"),
        }
    }

    fn allocate_exact(&mut self) {
        let Some(i) = self.rng.pick(&self.with_status(|s| *s == Status::Up)) else {
            return;
        };
        let subnet = self.pool.subnet();
        // Mostly inside the space, sometimes anywhere around the subnet.
        let (base, size) = if self.rng.percent(80) {
            let s = self.pool.space();
            (u32::from(s.network()), s.size())
        } else {
            (u32::from(subnet.network()), subnet.size() + 4)
        };
        let ip = Ipv4Addr::from(base.wrapping_add(self.rng.below(size as usize) as u32));
        let ep = self.new_ep();
        let me = self.hosts[i].id;
        match self.hosts[i].state.allocate_exact(ip, ep) {
            Ok(()) => {
                self.hosts[i].persist();
                self.stats.exact_ok += 1;
                self.log(format!("{} allocate exact {ip}", me.short()));
            }
            Err(AllocError::OwnedBy(owner)) => {
                self.log(format!("{} asks {} for {ip}", me.short(), owner.short()));
                self.request(me, owner, Want::Exact(ip));
            }
            Err(
                AllocError::InUse(_)
                | AllocError::NoRangeOwned
                | AllocError::NotInPool
                | AllocError::Reserved
                | AllocError::Quarantined,
            ) => {}
            Err(e) => panic!("allocate_exact {ip} on {me}: unexpected {e}"),
        }
    }

    fn request(&mut self, me: NodeId, donor: NodeId, want: Want) {
        self.send(me, donor, Body::Request(DonationRequest { to: me, want }));
    }

    fn free(&mut self) {
        let busy = self.with_status(|s| *s == Status::Up);
        let busy: Vec<usize> = busy
            .into_iter()
            .filter(|i| !self.hosts[*i].state.allocations().is_empty())
            .collect();
        let Some(i) = self.rng.pick(&busy) else {
            return;
        };
        let ips: Vec<Ipv4Addr> = self.hosts[i].state.allocations().keys().copied().collect();
        let ip = ips[self.rng.below(ips.len())];
        let tick = self.tick;
        self.hosts[i]
            .state
            .free(ip, tick)
            .expect("free an allocated address");
        self.hosts[i].persist();
        self.stats.freed += 1;
        let me = self.hosts[i].id.short();
        self.log(format!("{me} free {ip}"));
    }

    fn release(&mut self) {
        let Some(i) = self.rng.pick(&self.with_status(|s| *s == Status::Up)) else {
            return;
        };
        let upto = self.tick.saturating_sub(QUARANTINE_TICKS);
        if !self.hosts[i].state.release_quarantine(upto).is_empty() {
            self.hosts[i].persist();
        }
    }

    fn gossip(&mut self) {
        let live = self.with_status(|s| *s != Status::Down);
        let (Some(i), Some(j)) = (
            self.rng.pick(&live),
            self.rng.pick(&(0..self.hosts.len()).collect::<Vec<_>>()),
        ) else {
            return;
        };
        if i == j {
            return;
        }
        let ring = self.hosts[i].state.ring().clone();
        let (from, to) = (self.hosts[i].id, self.hosts[j].id);
        self.send(from, to, Body::Gossip(ring));
    }

    fn repartition(&mut self) {
        let heal = self.rng.percent(40);
        for h in 0..self.hosts.len() {
            self.hosts[h].group = if heal { 0 } else { self.rng.below(3) as u8 };
        }
        self.log(format!("partition (heal: {heal})"));
    }

    fn crash(&mut self) {
        let up = self.with_status(|s| *s == Status::Up);
        if up.len() < 2 {
            return;
        }
        let Some(i) = self.rng.pick(&up) else { return };
        self.crash_host(i);
    }

    fn crash_host(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.state = wire(&h.disk);
        h.state.set_signer(h.signer.clone());
        h.status = Status::Down;
        self.stats.crashes += 1;
        let me = self.hosts[i].id.short();
        self.log(format!("{me} crashed"));
    }

    fn restart(&mut self) {
        if let Some(i) = self.rng.pick(&self.with_status(|s| *s == Status::Down)) {
            self.hosts[i].status = Status::Up;
            let me = self.hosts[i].id.short();
            self.log(format!("{me} restarted"));
        }
    }

    /// Clean leave: detach everything, wait out the quarantine, hand off.
    fn leave(&mut self) {
        let targets = self.handoff_targets();
        let staying = self.with_status(|s| !matches!(s, Status::Leaving { .. }));
        if staying.len() <= MIN_HOSTS {
            return;
        }
        let up: Vec<usize> = self
            .with_status(|s| *s == Status::Up)
            .into_iter()
            .filter(|i| !targets.contains(&self.hosts[*i].id))
            .collect();
        let (Some(i), Some(j)) = (
            self.rng.pick(&up),
            self.rng.pick(&self.with_status(|s| *s == Status::Up)),
        ) else {
            return;
        };
        if i == j {
            return;
        }
        let to = self.hosts[j].id;
        let tick = self.tick;
        let h = &mut self.hosts[i];
        let ips: Vec<Ipv4Addr> = h.state.allocations().keys().copied().collect();
        for ip in ips {
            h.state.free(ip, tick).expect("free");
        }
        h.state.release_quarantine(u64::MAX);
        match h.state.hand_off_all(to) {
            Ok(_) => {}
            Err(HandOffError::NoRing) => {
                // Never heard of the pool, so owns nothing: just go.
                let h = self.hosts.remove(i);
                self.departed.push(h.id);
                self.gone.push(h.id);
                self.log(format!("{} left without a ring", h.id.short()));
                return;
            }
            Err(e) => panic!("hand off after detaching everything: {e}"),
        }
        h.persist();
        h.status = Status::Leaving { to, seq: 1 };
        self.stats.leaves += 1;
        let me = self.hosts[i].id.short();
        self.log(format!("{me} leaves, hands off to {}", to.short()));
        self.send_hand_off(i);
    }

    fn send_hand_off(&mut self, i: usize) {
        let Status::Leaving { to, seq } = self.hosts[i].status else {
            return;
        };
        let ring = self.hosts[i].state.ring().clone();
        let from = self.hosts[i].id;
        self.send(from, to, Body::HandOff(ring, seq));
    }

    /// A leaving host that learns of new blocks (grants that were in
    /// flight) hands them off too.
    fn rehand_off(&mut self, i: usize) {
        let Status::Leaving { to, seq } = self.hosts[i].status else {
            return;
        };
        let me = self.hosts[i].id;
        if self.hosts[i].state.ranges_of(me).is_empty() {
            return;
        }
        self.hosts[i]
            .state
            .hand_off_all(to)
            .expect("leaving host holds nothing");
        self.hosts[i].persist();
        self.hosts[i].status = Status::Leaving { to, seq: seq + 1 };
        self.send_hand_off(i);
    }

    /// Disk loss: the host is gone for good (it would return under a new
    /// identity, which `join` models).
    fn die(&mut self) {
        let targets = self.handoff_targets();
        let staying = self.with_status(|s| !matches!(s, Status::Leaving { .. }));
        if staying.len() <= MIN_HOSTS {
            return;
        }
        let victims: Vec<usize> = staying
            .into_iter()
            .filter(|i| !targets.contains(&self.hosts[*i].id))
            .collect();
        let Some(i) = self.rng.pick(&victims) else {
            return;
        };
        // Losing every copy of the ring loses the network's ownership map
        // (nothing to heal from); keep at least one on another host's disk.
        let holders = (0..self.hosts.len())
            .filter(|k| *k != i && !self.hosts[*k].disk.ring().is_empty())
            .count();
        if holders == 0 {
            return;
        }
        let h = self.hosts.remove(i);
        self.departed.push(h.id);
        self.gone.push(h.id);
        self.stats.deaths += 1;
        self.log(format!("{} died", h.id.short()));
    }

    fn join(&mut self) {
        if self.hosts.len() >= MAX_HOSTS {
            return;
        }
        let Some(src) = self.rng.pick(&self.with_status(|s| *s == Status::Up)) else {
            return;
        };
        // Sometimes with the peers' ring, sometimes with none yet (the
        // agent creates allocators lazily and learns the ring by gossip).
        let ring = if self.rng.percent(70) {
            wire(self.hosts[src].state.ring())
        } else {
            Ring::default()
        };
        let key = self.new_signer();
        let id = key.id();
        let group = self.hosts[src].group;
        self.add_host(Allocator::join(key, ring), group);
        self.stats.joins += 1;
        self.log(format!("{} joined", id.short()));
    }

    /// The operator's command, run once, on a healthy cluster: every host
    /// up and reachable, in-flight messages settled, replicas converged.
    /// A departed host stays on the operator's list until no replica names
    /// it (the reclaimer may die before its reclaim spreads).
    fn operator_reclaim(&mut self) {
        if self.departed.is_empty() {
            return;
        }
        self.heal_and_sync();
        let converged = self.hosts[0].state.ring().clone();
        self.departed
            .retain(|d| !converged.ranges_of(*d).is_empty());
        let up = self.with_status(|s| *s == Status::Up);
        let (Some(c), Some(b)) = (self.rng.pick(&up), self.rng.pick(&up)) else {
            return;
        };
        let me = self.hosts[c].id;
        // Usually for itself; sometimes on behalf of another host, which
        // learns it from the grant or, if that is lost, from gossip.
        let by = if self.rng.percent(70) {
            me
        } else {
            self.hosts[b].id
        };
        for dead in self.departed.clone() {
            if self.hosts[c].state.ranges_of(dead).is_empty() {
                continue;
            }
            let g = self.hosts[c].state.reclaim(dead, by).expect("reclaim");
            assert!(!g.entries.is_empty());
            self.hosts[c].persist();
            self.stats.reclaims += 1;
            self.log(format!(
                "{} reclaims {} for {}",
                me.short(),
                dead.short(),
                by.short()
            ));
            if by != me {
                self.send(me, by, Body::Grant(g));
            }
        }
    }

    // ---- the network

    fn deliver_one(&mut self) {
        let lossy = self.chaos;
        if self.net.is_empty() {
            return;
        }
        let k = self.rng.below(self.net.len());
        let msg = self.net.swap_remove(k);
        if lossy && self.rng.percent(10) {
            self.stats.lost += 1;
            return;
        }
        let (Some(s), Some(r)) = (self.idx(msg.from), self.idx(msg.to)) else {
            // To a departed host: dropped. From one: it may still arrive.
            let r = self.idx(msg.to);
            if let Some(r) = r.filter(|r| self.hosts[*r].status != Status::Down) {
                self.handle(r, msg);
            }
            return;
        };
        if self.hosts[r].status == Status::Down || self.hosts[s].group != self.hosts[r].group {
            self.stats.lost += 1;
            return;
        }
        if lossy && self.rng.percent(5) {
            self.stats.duplicated += 1;
            self.net.push(msg.clone());
        }
        self.handle(r, msg);
    }

    fn handle(&mut self, r: usize, msg: Msg) {
        let me = self.hosts[r].id;
        match msg.body {
            Body::Request(req) => {
                match self.hosts[r].state.donate(req) {
                    Ok(grant) => {
                        if self.chaos && self.rng.percent(3) {
                            // Crash after the write, before it is on disk:
                            // the donation never happened, nothing is sent.
                            self.log(format!("{} donated, crashed before persisting", me.short()));
                            self.crash_host(r);
                            return;
                        }
                        self.hosts[r].persist();
                        self.stats.donations += 1;
                        let blocks: Vec<String> =
                            grant.entries.iter().map(|e| e.block.to_string()).collect();
                        self.log(format!(
                            "{} donates {blocks:?} to {}",
                            me.short(),
                            req.to.short()
                        ));
                        self.send(me, req.to, Body::Grant(grant));
                    }
                    Err(_) => self.stats.refused_donations += 1,
                }
            }
            Body::Grant(grant) => {
                let gone = self.gone.clone();
                match self.hosts[r]
                    .state
                    .accept(&grant, msg.from, &|n| gone.contains(&n))
                {
                    Ok(()) => {}
                    // No ring yet (reclaimed for a host that never heard of
                    // the pool): gossip brings both.
                    Err(AcceptError::NoRing) => return,
                    // The recipient's replica does not yet know the donor
                    // owned the block (it missed steps): the grant's
                    // entries reach it by gossip once the owner it knows
                    // vouches for them.
                    Err(AcceptError::Unauthorized(_)) => return,
                    Err(e) => panic!("{me} refused a grant from {}: {e}", msg.from),
                }
                if self.chaos && self.rng.percent(3) {
                    self.log(format!(
                        "{} accepted, crashed before persisting",
                        me.short()
                    ));
                    self.crash_host(r);
                    return;
                }
                self.hosts[r].persist();
                self.stats.grants_accepted += 1;
                self.log(format!(
                    "{} accepted grant from {}",
                    me.short(),
                    msg.from.short()
                ));
                self.rehand_off(r);
            }
            Body::Gossip(ring) => {
                let gone = self.gone.clone();
                let changed = merge(&mut self.hosts[r].state, msg.from, &ring, &gone).changed;
                self.stats.merges += 1;
                // Merges only add knowledge: persisted lazily.
                if changed && self.rng.percent(50) {
                    self.hosts[r].persist();
                }
                self.rehand_off(r);
            }
            Body::HandOff(ring, seq) => {
                let gone = self.gone.clone();
                merge(&mut self.hosts[r].state, msg.from, &ring, &gone);
                // Adopted and on disk before the ack.
                self.hosts[r].persist();
                self.rehand_off(r);
                self.send(me, msg.from, Body::HandOffAck(seq));
            }
            Body::HandOffAck(seq) => {
                if self.hosts[r].status == (Status::Leaving { to: msg.from, seq }) {
                    let h = self.hosts.remove(r);
                    self.departed.push(h.id);
                    self.gone.push(h.id);
                    self.log(format!("{} left", h.id.short()));
                }
            }
        }
    }

    // ---- healing and checks

    /// Every host up and in one partition; deliver everything in flight;
    /// gossip all-to-all until nothing changes; finish pending leaves.
    fn heal_and_sync(&mut self) {
        for h in &mut self.hosts {
            h.status = match h.status {
                Status::Down => Status::Up,
                ref s => s.clone(),
            };
            h.group = 0;
        }
        self.chaos = false;
        for _round in 0..1000 {
            let mut budget = 100_000;
            while !self.net.is_empty() {
                self.deliver_one();
                budget -= 1;
                assert!(budget > 0, "network does not drain");
            }
            self.sync_all();
            let leaving = self.with_status(|s| matches!(s, Status::Leaving { .. }));
            if leaving.is_empty() && self.net.is_empty() {
                self.check();
                self.chaos = true;
                return;
            }
            for i in leaving {
                self.send_hand_off(i);
            }
        }
        panic!("healing does not converge");
    }

    fn sync_all(&mut self) {
        loop {
            let mut changed = false;
            for i in 0..self.hosts.len() {
                for j in 0..self.hosts.len() {
                    if i == j {
                        continue;
                    }
                    let ring = self.hosts[j].state.ring().clone();
                    let (from, gone) = (self.hosts[j].id, self.gone.clone());
                    if merge(&mut self.hosts[i].state, from, &ring, &gone).changed {
                        changed = true;
                        self.hosts[i].persist();
                    }
                    self.rehand_off(i);
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// The invariants, after every step: each host's own state (skipped
    /// when unchanged: progress grows with every ring change), then across
    /// hosts, in full.
    fn check(&mut self) {
        for h in &mut self.hosts {
            let fp = h.fingerprint();
            if h.checked == Some(fp) {
                continue;
            }
            if let Err(e) = h.state.check() {
                panic!("host {}: {e}", h.id);
            }
            h.checked = Some(fp);
        }
        if let Err(e) = check_disjoint(self.hosts.iter().map(|h| (h.id, h.state.ring()))) {
            panic!("{e}");
        }
        if let Err(e) = check_unique_addresses(self.hosts.iter().map(|h| &h.state)) {
            panic!("{e}");
        }
    }

    fn assert_converged(&self) {
        if let Err(e) = check_converged(self.hosts.iter().map(|h| (h.id, h.state.ring()))) {
            panic!("after healing: {e}");
        }
    }

    fn finish(&mut self) {
        self.heal_and_sync();
        self.assert_converged();
        self.operator_reclaim();
        self.heal_and_sync();
        self.assert_converged();
        let present: Vec<NodeId> = self.hosts.iter().map(|h| h.id).collect();
        for e in self.hosts[0].state.ring().entries() {
            assert!(present.contains(&e.owner), "{e} belongs to a departed host");
        }
        self.fill();
    }

    /// Liveness: with every host reachable, allocating until every host is
    /// refused uses every usable address exactly once.
    fn fill(&mut self) {
        for h in &mut self.hosts {
            h.state.release_quarantine(u64::MAX);
            h.persist();
        }
        self.sync_all();
        for _round in 0..10_000 {
            let mut progress = false;
            for i in 0..self.hosts.len() {
                loop {
                    let ep = self.new_ep();
                    // No crashes here: persisting each step would only cost time.
                    match self.hosts[i].state.allocate(ep) {
                        Ok(_) => progress = true,
                        Err(AllocError::NeedDonation { candidates }) => {
                            if !self.ask(i, &candidates) {
                                break;
                            }
                            progress = true;
                        }
                        Err(AllocError::Exhausted) => break,
                        Err(e) => panic!("fill: {e}"),
                    }
                }
            }
            self.check();
            self.sync_all();
            if !progress {
                let held: usize = self.hosts.iter().map(|h| h.state.allocations().len()).sum();
                assert_eq!(held as u32, self.pool.usable_count(), "addresses lost");
                return;
            }
        }
        panic!("fill does not terminate");
    }

    fn ask(&mut self, i: usize, candidates: &[(NodeId, u32)]) -> bool {
        let me = self.hosts[i].id;
        for (donor, _) in candidates {
            let Some(d) = self.idx(*donor) else { continue };
            let req = DonationRequest {
                to: me,
                want: Want::Half,
            };
            if let Ok(g) = self.hosts[d].state.donate(req) {
                self.hosts[i]
                    .state
                    .accept(&g, *donor, &|_| false)
                    .expect("fill: accept");
                return true;
            }
        }
        false
    }
}

fn run(seed: u64, steps: usize) -> Stats {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.finish();
    std::mem::take(&mut sim.stats)
}

#[test]
fn ipam_simulation() {
    let steps = std::env::var("IPAM_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS);
    let count = std::env::var("IPAM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let seeds: Vec<u64> = match std::env::var("IPAM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=count).collect(),
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    for seed in seeds {
        let s = run(seed, steps);
        total.allocated += s.allocated;
        total.need_donation += s.need_donation;
        total.exhausted += s.exhausted;
        total.exact_ok += s.exact_ok;
        total.freed += s.freed;
        total.donations += s.donations;
        total.refused_donations += s.refused_donations;
        total.grants_accepted += s.grants_accepted;
        total.merges += s.merges;
        total.lost += s.lost;
        total.duplicated += s.duplicated;
        total.crashes += s.crashes;
        total.leaves += s.leaves;
        total.deaths += s.deaths;
        total.joins += s.joins;
        total.reclaims += s.reclaims;
    }
    println!(
        "ipam_sim: {steps} steps per seed in {:?}: {total:?}",
        started.elapsed()
    );
    // The run must have exercised what it claims to.
    assert!(total.donations > 0 && total.grants_accepted > 0 && total.need_donation > 0);
    assert!(total.crashes > 0 && total.leaves > 0 && total.deaths > 0 && total.reclaims > 0);
}
