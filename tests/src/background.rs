//! Processes that run in the background of a test: continuous pings, DNS
//! queries and iperf3 servers inside container namespaces.
//!
//! Every one is registered with its lab; dropping the handle kills and
//! reaps it, and a lab that is dropped first kills what is still
//! registered. Each also gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies with
//! the test thread that started it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Container;
use crate::Lab;
use crate::agent::signal;
use crate::cmd::{CmdOutput, command_line};
use crate::lab::Registry;

type Lines = Arc<Mutex<Vec<String>>>;

/// A background process with its stdout collected line by line as it comes.
#[derive(Debug)]
pub struct Background {
    command: String,
    child: Child,
    pid: i32,
    lines: Lines,
    out: Option<JoinHandle<()>>,
    err: Option<JoinHandle<String>>,
    registry: Registry,
    status: Option<ExitStatus>,
}

impl Background {
    /// Starts `cmd` (stdin closed, stdout and stderr collected) and
    /// registers it with the lab.
    pub fn spawn(lab: &Lab, cmd: &mut Command) -> Result<Self> {
        let command = command_line(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the hook runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe and uses no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        lab.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid);
        let lines: Lines = Arc::default();
        let out = child.stdout.take().map(|pipe| {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            })
        });
        let err = child.stderr.take().map(|mut pipe| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        });
        Ok(Self {
            command,
            child,
            pid,
            lines,
            out,
            err,
            registry: Arc::clone(&lab.background),
            status: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    /// The stdout lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped(status);
                false
            }
            _ => true,
        }
    }

    /// Waits until a stdout line contains `needle`; fails if the process
    /// ends first or `timeout` passes.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines().iter().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if !self.running() {
                bail!(
                    "`{}` ended ({:?}) without printing {needle:?}; stdout:\n{}",
                    self.command,
                    self.status,
                    self.lines().join("\n")
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{}` did not print {needle:?} within {timeout:?}; stdout:\n{}",
                    self.command,
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig`, waits up to `timeout` for the process to end (SIGKILL
    /// after that), and returns everything it printed. Ending by the signal
    /// sent is not an error; look at the status.
    pub fn stop(mut self, sig: i32, timeout: Duration) -> Result<CmdOutput> {
        let mut killed = false;
        if self.running() {
            signal(self.pid, sig);
            let deadline = Instant::now() + timeout;
            while self.running() {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    killed = true;
                    let status = self.child.wait().context("reaping")?;
                    self.reaped(status);
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(h) = self.out.take() {
            let _ = h.join();
        }
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let out = CmdOutput {
            command: self.command.clone(),
            status: self.status.expect("reaped above"),
            stdout: self.lines().join("\n"),
            stderr,
        };
        if killed {
            bail!(
                "`{}` ignored signal {sig} for {timeout:?} and was killed: {out}",
                self.command
            );
        }
        Ok(out)
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.pid);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.reaped(status);
            }
        }
    }
}

// ---- continuous ping --------------------------------------------------------

/// The interval of [`Lab::start_ping`]'s pings.
pub const PING_INTERVAL: Duration = Duration::from_millis(50);

/// A continuous `ping -D -O -n -i 0.05 -W 1 TARGET` in a container.
#[derive(Debug)]
pub struct Ping {
    bg: Background,
    /// `h1/c1 -> 198.19.0.4`, for messages.
    pub what: String,
    started: SystemTime,
}

impl Lab {
    /// Starts a continuous ping (every 50 ms, with timestamps) from
    /// container `from` to `target`.
    pub fn start_ping(&self, from: &Container, target: &str) -> Result<Ping> {
        let interval = format!("{}", PING_INTERVAL.as_secs_f64());
        let mut cmd = self.exec_in_command(
            from,
            &["ping", "-D", "-O", "-n", "-i", &interval, "-W", "1", target],
        );
        let started = SystemTime::now();
        let bg = Background::spawn(self, &mut cmd)?;
        Ok(Ping {
            bg,
            what: format!("{from} -> {target}"),
            started,
        })
    }
}

impl Ping {
    /// What ping printed so far, parsed (no summary yet: `transmitted` is
    /// the highest sequence number seen).
    pub fn progress(&self) -> PingReport {
        PingReport::parse(&self.what, &self.bg.lines().join("\n"), self.started)
    }

    /// Waits until at least `n` replies came back.
    pub fn wait_replies(&mut self, n: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let p = self.progress();
            if p.replies.len() >= n {
                return Ok(start.elapsed());
            }
            if !self.bg.running() {
                bail!(
                    "{}: ping ended early: {p}\n{}",
                    self.what,
                    self.bg.lines().join("\n")
                );
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{}: {n} replies not reached within {timeout:?}: {p}",
                    self.what
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.bg.pid()
    }

    /// When the ping started (for relating events to its timeline).
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// Stops it with SIGINT and parses everything it printed, including the
    /// summary line.
    pub fn stop(self) -> Result<PingReport> {
        let what = self.what.clone();
        let out = self.bg.stop(libc::SIGINT, Duration::from_secs(3))?;
        let report = PingReport::parse(&what, &out.stdout, self.started);
        if report.summary.is_none() {
            bail!("{what}: no summary line in ping's output: {out}");
        }
        Ok(report)
    }
}

/// What a continuous ping observed.
#[derive(Debug, Clone, Default)]
pub struct PingReport {
    pub what: String,
    /// `(transmitted, received)` from ping's summary line, once stopped.
    pub summary: Option<(u64, u64)>,
    /// Packets sent: the summary's count, or before that the highest
    /// sequence number seen.
    pub transmitted: u64,
    /// Sequence number -> seconds since the ping started, of each reply.
    pub replies: BTreeMap<u64, f64>,
    /// Duplicate replies.
    pub duplicates: u64,
    /// Sequence numbers sent and never answered, *not counting the last
    /// one sent* (it may have been in flight when ping was stopped).
    pub lost: Vec<u64>,
    /// Lines that were neither replies nor bookkeeping (`Destination Host
    /// Unreachable`, ...), at most 20.
    pub other: Vec<String>,
}

impl PingReport {
    /// Parses iputils ping output of `-D -O` (also partial output).
    pub fn parse(what: &str, text: &str, started: SystemTime) -> Self {
        let t0 = started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut r = PingReport {
            what: what.to_string(),
            ..Default::default()
        };
        let mut max_seq = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.contains("packets transmitted") {
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if nums.len() >= 2 {
                    r.summary = Some((nums[0], nums[1]));
                }
                continue;
            }
            let seq = field(line, "icmp_seq=");
            if let Some(seq) = seq {
                max_seq = max_seq.max(seq);
            }
            let ts = line
                .strip_prefix('[')
                .and_then(|rest| rest.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            if let (true, Some(seq)) = (line.contains(" bytes from "), seq) {
                if line.contains("DUP!") {
                    r.duplicates += 1;
                } else {
                    r.replies.insert(seq, ts.map_or(0.0, |t| t - t0));
                }
            } else if line.contains("no answer yet")
                || line.starts_with("PING ")
                || line.starts_with("---")
                || line.starts_with("rtt ")
                || line.is_empty()
            {
            } else if r.other.len() < 20 {
                r.other.push(line.to_string());
            }
        }
        r.transmitted = r.summary.map_or(max_seq, |(t, _)| t);
        r.lost = (1..r.transmitted)
            .filter(|s| !r.replies.contains_key(s))
            .collect();
        r
    }

    /// Replies received.
    pub fn received(&self) -> u64 {
        self.replies.len() as u64
    }

    /// Runs of consecutive lost sequence numbers, each with the times (since
    /// the ping started) of the replies just before and just after it.
    pub fn lost_windows(&self) -> Vec<LostWindow> {
        let mut out: Vec<LostWindow> = Vec::new();
        for &s in &self.lost {
            match out.last_mut() {
                Some(w) if w.last + 1 == s => w.last = s,
                _ => out.push(LostWindow {
                    first: s,
                    last: s,
                    after: None,
                    before: None,
                }),
            }
        }
        for w in &mut out {
            w.after = self.replies.range(..w.first).next_back().map(|(_, &t)| t);
            w.before = self.replies.range(w.last + 1..).next().map(|(_, &t)| t);
        }
        out
    }

    /// Whether every packet from sequence number `from` on (but the last
    /// one sent) was answered.
    pub fn answered_since(&self, from: u64) -> bool {
        (from..self.transmitted).all(|s| self.replies.contains_key(&s))
    }

    /// The first sequence number after which every packet (but the last,
    /// possibly in flight) was answered.
    pub fn steady_from(&self) -> u64 {
        self.lost.last().map_or(1, |l| l + 1)
    }

    /// The reply time (seconds since start) of sequence number `seq`.
    pub fn reply_time(&self, seq: u64) -> Option<f64> {
        self.replies.get(&seq).copied()
    }
}

/// A run of lost pings (see [`PingReport::lost_windows`]).
#[derive(Debug, Clone, Copy)]
pub struct LostWindow {
    pub first: u64,
    pub last: u64,
    /// Time of the last reply before the window (seconds since start).
    pub after: Option<f64>,
    /// Time of the first reply after it.
    pub before: Option<f64>,
}

impl fmt::Display for LostWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |x: Option<f64>| x.map_or("?".to_string(), |x| format!("{x:.2} s"));
        write!(
            f,
            "seq {}..={} ({} lost, between replies at {} and {})",
            self.first,
            self.last,
            self.last - self.first + 1,
            t(self.after),
            t(self.before)
        )
    }
}

impl fmt::Display for PingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of {} pings lost ({} sent, {} replies",
            self.what,
            self.lost.len(),
            self.transmitted.saturating_sub(1),
            self.transmitted,
            self.received()
        )?;
        if let Some((t, r)) = self.summary {
            write!(f, "; ping's summary: {t} transmitted, {r} received")?;
        }
        if self.duplicates > 0 {
            write!(f, ", {} duplicates", self.duplicates)?;
        }
        write!(f, ")")?;
        let windows = self.lost_windows();
        if !windows.is_empty() {
            let shown: Vec<String> = windows.iter().take(5).map(|w| w.to_string()).collect();
            write!(f, "; lost: {}", shown.join(", "))?;
            if windows.len() > 5 {
                write!(f, " and {} more windows", windows.len() - 5)?;
            }
        }
        if !self.other.is_empty() {
            write!(f, "; other output: {:?}", self.other)?;
        }
        Ok(())
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

// ---- iperf3 -------------------------------------------------------------------

/// The result of one iperf3 TCP run (client side, `-J`).
#[derive(Debug, Clone)]
pub struct IperfResult {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub seconds: f64,
    /// Receiver's throughput.
    pub bits_per_second: f64,
    pub retransmits: Option<u64>,
}

impl fmt::Display for IperfResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1} MB in {:.1} s = {:.0} Mbit/s",
            self.bytes_received as f64 / 1e6,
            self.seconds,
            self.bits_per_second / 1e6
        )?;
        if let Some(r) = self.retransmits {
            write!(f, ", {r} retransmits")?;
        }
        Ok(())
    }
}

impl Lab {
    /// Starts a one-shot iperf3 server (`iperf3 -s -1`) in container `c` and
    /// waits until it listens. It ends after one client; the handle kills it
    /// otherwise.
    pub fn iperf3_server(&self, c: &Container) -> Result<Background> {
        let mut cmd = self.exec_in_command(c, &["iperf3", "-s", "-1", "--forceflush"]);
        let mut bg = Background::spawn(self, &mut cmd)?;
        bg.wait_for_line("Server listening", Duration::from_secs(10))?;
        Ok(bg)
    }

    /// A TCP run of `seconds` from container `client` to an iperf3 server at
    /// `server_ip` in container `server` (started and stopped here).
    pub fn iperf3(
        &self,
        client: &Container,
        server: &Container,
        server_ip: &str,
        seconds: u32,
    ) -> Result<IperfResult> {
        let srv = self.iperf3_server(server)?;
        let secs = seconds.to_string();
        let out = self.exec_in(
            client,
            &[
                "iperf3",
                "-c",
                server_ip,
                "-t",
                &secs,
                "-J",
                "--connect-timeout",
                "3000",
            ],
        )?;
        let _ = srv.stop(libc::SIGTERM, Duration::from_secs(3));
        let v: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("iperf3 output is not JSON: {out}"))?;
        if let Some(e) = v.get("error") {
            bail!("iperf3 {client} -> {server_ip} failed: {e}");
        }
        if !out.success() {
            bail!("iperf3 failed: {out}");
        }
        let end = &v["end"];
        let num = |v: &Value| v.as_f64().unwrap_or(0.0);
        Ok(IperfResult {
            bytes_sent: end["sum_sent"]["bytes"].as_u64().unwrap_or(0),
            bytes_received: end["sum_received"]["bytes"].as_u64().unwrap_or(0),
            seconds: num(&end["sum_received"]["seconds"]),
            bits_per_second: num(&end["sum_received"]["bits_per_second"]),
            retransmits: end["sum_sent"]["retransmits"].as_u64(),
        })
    }
}

/// Distinct values, for "60 distinct IPs".
pub fn distinct<T: Ord + Clone>(items: &[T]) -> BTreeSet<T> {
    items.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\
PING 198.19.0.4 (198.19.0.4) 56(84) bytes of data.
[1000.100000] 64 bytes from 198.19.0.4: icmp_seq=1 ttl=64 time=0.080 ms
[1000.150000] 64 bytes from 198.19.0.4: icmp_seq=2 ttl=64 time=0.070 ms
[1000.250000] no answer yet for icmp_seq=3
[1000.300000] no answer yet for icmp_seq=4
[1000.350000] 64 bytes from 198.19.0.4: icmp_seq=5 ttl=64 time=0.070 ms
[1000.360000] 64 bytes from 198.19.0.4: icmp_seq=5 ttl=64 time=0.070 ms (DUP!)
[1000.400000] From 198.19.0.2 icmp_seq=6 Destination Host Unreachable
[1000.450000] 64 bytes from 198.19.0.4: icmp_seq=7 ttl=64 time=0.070 ms

--- 198.19.0.4 ping statistics ---
8 packets transmitted, 4 received, +1 duplicates, +1 errors, 50% packet loss, time 400ms
rtt min/avg/max/mdev = 0.070/0.072/0.080/0.004 ms
";

    #[test]
    fn parses_replies_losses_and_summary() {
        let start = UNIX_EPOCH + Duration::from_secs(1000);
        let r = PingReport::parse("x", OUT, start);
        assert_eq!(r.summary, Some((8, 4)));
        assert_eq!(r.transmitted, 8);
        assert_eq!(r.received(), 4);
        assert_eq!(r.duplicates, 1);
        // seq 8 was the last one sent: maybe in flight at SIGINT, not lost.
        assert_eq!(r.lost, vec![3, 4, 6]);
        let w = r.lost_windows();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].first, w[0].last), (3, 4));
        assert!((w[0].after.unwrap() - 0.15).abs() < 1e-6);
        assert!((w[0].before.unwrap() - 0.35).abs() < 1e-6);
        assert_eq!(r.steady_from(), 7);
        assert!(r.answered_since(7));
        assert!(!r.answered_since(6));
        assert_eq!(r.other.len(), 1, "{:?}", r.other);
        let text = r.to_string();
        assert!(text.contains("3 of 7 pings lost"), "{text}");
    }

    #[test]
    fn partial_output_counts_up_to_the_highest_seq() {
        let partial: String = OUT.lines().take(4).collect::<Vec<_>>().join("\n");
        let r = PingReport::parse("x", &partial, UNIX_EPOCH);
        assert_eq!(r.summary, None);
        assert_eq!(r.transmitted, 3);
        assert_eq!(r.lost, Vec::<u64>::new());
    }
}

/// A continuous stream of DNS queries from a container: `dig` for one
/// name, one query at a time, every [`QUERY_INTERVAL`]. Each query is
/// allowed `dig +time=1 +tries=3`, a client that retries like glibc's
/// resolver does (it waits 5 s, twice, by default).
#[derive(Debug)]
pub struct DnsQueries {
    bg: Background,
    what: String,
    expect: String,
}

pub const QUERY_INTERVAL: Duration = Duration::from_millis(50);

/// What a stream of DNS queries observed.
#[derive(Debug, Clone, Default)]
pub struct DnsReport {
    pub what: String,
    /// Queries that completed (answered or failed).
    pub queries: usize,
    /// Queries whose answer was the expected address, and the longest of
    /// them in seconds.
    pub answered: usize,
    pub slowest: f64,
    /// Answered queries that dig had to send again (timeouts).
    pub retried: usize,
    /// The others: unix time the query started, and what dig printed.
    pub failed: Vec<(f64, String)>,
}

impl fmt::Display for DnsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of {} queries answered ({} after a retry, slowest {:.0} ms), {} failed",
            self.what,
            self.answered,
            self.queries,
            self.retried,
            self.slowest * 1000.0,
            self.failed.len()
        )?;
        for (t, out) in self.failed.iter().take(10) {
            write!(f, "\n  at {t:.3}: {out}")?;
        }
        Ok(())
    }
}

impl Lab {
    /// Starts querying `server` for `name`'s A record from `from`, until
    /// stopped; every answer must be `expect`.
    pub fn start_dns_queries(
        &self,
        from: &Container,
        server: &str,
        name: &str,
        expect: &str,
    ) -> Result<DnsQueries> {
        let script = format!(
            "set -f; while :; do t0=$(date +%s.%N); out=$(dig @{server} +short +time=1 +tries=3 {name} A 2>&1); \
             rc=$?; retries=$(printf '%s\\n' \"$out\" | grep -c '^;;'); \
             echo \"$t0 $(date +%s.%N) $rc $retries\" $(printf '%s\\n' \"$out\" | grep -v '^;;'); \
             sleep {}; done",
            QUERY_INTERVAL.as_secs_f64()
        );
        let mut cmd = self.exec_in_command(from, &["sh", "-c", &script]);
        let bg = Background::spawn(self, &mut cmd)?;
        Ok(DnsQueries {
            bg,
            what: format!("{from} -> {name} @{server}"),
            expect: expect.to_string(),
        })
    }
}

impl DnsQueries {
    pub fn progress(&self) -> DnsReport {
        DnsReport::parse(&self.what, &self.expect, &self.bg.lines())
    }

    /// Waits until `n` queries were answered.
    pub fn wait_answers(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let r = self.progress();
            if r.answered >= n {
                return Ok(());
            }
            if !self.bg.running() || start.elapsed() >= timeout {
                bail!("{n} answers not reached within {timeout:?}: {r}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the loop (a query cut short by the stop is not counted).
    pub fn stop(self) -> Result<DnsReport> {
        let out = self.bg.stop(libc::SIGKILL, Duration::from_secs(3))?;
        let lines: Vec<String> = out.stdout.lines().map(str::to_string).collect();
        Ok(DnsReport::parse(&self.what, &self.expect, &lines))
    }
}

impl DnsReport {
    /// Parses the loop's lines: `start end rc answer...`.
    pub fn parse(what: &str, expect: &str, lines: &[String]) -> Self {
        let mut r = DnsReport {
            what: what.to_string(),
            ..Default::default()
        };
        for line in lines {
            let mut f = line.splitn(5, ' ');
            let (Some(t0), Some(t1), Some(rc), Some(retries)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let (Ok(t0), Ok(t1)) = (t0.parse::<f64>(), t1.parse::<f64>()) else {
                continue;
            };
            let answer = f.next().unwrap_or("").trim();
            r.queries += 1;
            if rc == "0" && answer == expect {
                r.answered += 1;
                r.slowest = r.slowest.max(t1 - t0);
                if retries != "0" {
                    r.retried += 1;
                }
            } else {
                r.failed
                    .push((t0, format!("rc={rc} after {retries} errors: {answer}")));
            }
        }
        r
    }
}
