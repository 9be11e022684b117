//! Issue #6 acceptance, admission: `ovlctl cluster rotate-token` replaces
//! the join token; a new host joins with the new token (through a member
//! that learned it by gossip), a host with the old token is refused, and
//! members are unaffected, also across a restart.

use std::time::{Duration, Instant};

use anyhow::ensure;
use ovl_e2e::{Findings, Lab, POLL, always_for, host_addr, wait_until};

fn token_of(lab: &Lab, k: usize) -> anyhow::Result<String> {
    Ok(lab
        .ctl_ok(k, &["cluster", "join-token"])?
        .stdout
        .trim()
        .to_string())
}

#[test]
fn rotate_token_admits_with_the_new_token_only_and_members_stay() {
    let mut lab = Lab::new(4).expect("lab");
    for k in 1..=4 {
        lab.start_agent(k, &[]).expect("agent");
    }
    let init = lab.cluster_init(1).expect("init");
    let old = init.join_token.clone();
    lab.cluster_join(2, &old, &[&host_addr(1).to_string()])
        .expect("h2 joins with the first token");
    lab.wait_members(&[1, 2]).expect("h1 and h2 form a cluster");
    let mut f = Findings::new();

    let out = lab
        .ctl_ok(1, &["cluster", "rotate-token"])
        .expect("rotate-token");
    let new = out.stdout.trim().to_string();
    println!(
        "rotate-token printed {} line(s)",
        out.stdout.lines().count()
    );
    f.check(
        out.stdout.lines().count() == 1 && new.starts_with("OVLTKN-1-"),
        || format!("rotate-token should print the token alone on one line: {out}"),
    );
    f.check(new != old, || "rotate-token printed the old token".into());
    f.check(new.split('-').nth(2) == old.split('-').nth(2), || {
        format!("the new token {new:.42} names another cluster than {old:.42}")
    });
    let t = Instant::now();
    let learned = wait_until(Duration::from_secs(10), POLL, || {
        Ok(token_of(&lab, 2)? == new)
    });
    f.ok(
        "h2 learns the new token",
        learned.map(|d| println!("h2 admits with the new token after {d:.2?}")),
    );

    // A new host joins with the new token, through h2 (not the rotator),
    // reading it from a file so it is on no command line.
    let file = lab.dir().join("new-token");
    std::fs::write(&file, format!("{new}\n")).expect("token file");
    let joined = lab.ctl_ok(
        3,
        &[
            "cluster",
            "join",
            "--token-file",
            &file.display().to_string(),
            &host_addr(2).to_string(),
        ],
    );
    f.ok(
        "h3 joins with the new token (from a file) via h2",
        joined.map(|_| ()),
    );
    f.ok(
        "all three alive everywhere",
        lab.wait_members(&[1, 2, 3])
            .map(|d| println!("h3 alive everywhere {d:.2?} after joining")),
    );

    // The old token no longer admits, at the rotator or elsewhere.
    for seed in [1, 2] {
        let out = lab
            .ctl(
                4,
                &[
                    "cluster",
                    "join",
                    "--token",
                    &old,
                    &host_addr(seed).to_string(),
                ],
            )
            .expect("ovlctl runs");
        let line = out.one_line_error();
        println!(
            "h4 joining with the old token via h{seed}: exit {:?} {line:?}",
            out.code()
        );
        f.check(out.code() == Some(1), || {
            format!("old token via h{seed}: {out}")
        });
        f.check(line.is_ok_and(|l| l.contains("does not match")), || {
            format!("old token via h{seed}: want a clear refusal: {out}")
        });
    }
    let h4 = lab.node_name(4);
    let absent = always_for(Duration::from_secs(3), POLL, || {
        for k in 1..=3 {
            let rows = lab.nodes(k)?;
            ensure!(!rows.iter().any(|r| r.name == h4), "h{k} lists h4");
        }
        Ok(())
    });
    f.ok("h4 never appears", absent.map(|_| ()));

    // Members stay: alive in every view, and a restart rejoins by itself
    // with the persisted cluster key and the new token.
    let stayed = always_for(Duration::from_secs(2), POLL, || {
        for k in 1..=3 {
            let alive = lab.nodes(k)?.iter().filter(|r| r.status == "alive").count();
            ensure!(alive == 3, "h{k} sees {alive} alive");
        }
        Ok(())
    });
    f.ok("members unaffected", stayed.map(|_| ()));
    f.ok("restart h2", lab.restart_agent(2));
    f.ok(
        "h2 rejoins after a restart",
        lab.wait_members(&[1, 2, 3])
            .map(|d| println!("h2 alive everywhere {d:.2?} after its restart")),
    );
    f.check(token_of(&lab, 2).is_ok_and(|t| t == new), || {
        "h2 forgot the rotated token across a restart".into()
    });
    println!("rotation test took {:.2?}", t.elapsed());
    f.finish();
}
