//! Check Point behind the [`Enforcer`] interface: every call is one `run-script` to a set of
//! gateways (through the management server's one session), followed to the end with
//! `show-task`. Block scripts are one `fw sam` per rule, each printing `samgate-rule <i>
//! <status>`, or (`fw_samp`) one `fw samp batch` per address family between two listings of
//! exactly the batch's rules, from which each rule's outcome is read; questions are
//! `fw samp get` by samgate's comment or `fw sam -M` by the rule's criteria, removals are
//! `fw sam -C` or `fw samp del` of the uids a question read back, and listings are `fw samp get`
//! or `fw sam -M … all`, IPv4 then IPv6.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;

use super::client::settle_targets;
use super::sam::{self, Operation, SamAction, SamMode, SamRule};
use super::unsettled::Unsettled;
use super::{ApiError, ManagementClient, RunScript, Task, TaskRef};
use crate::enforcer::{
    Answer, BackendError, Enforcer, Failed, Handle, Listing, Listings, Removal, Verified,
};
use crate::pipeline::decide::Enforce;
use crate::pipeline::rule::{self, Delivery, Presence};

/// One Check Point target: its server's client, and how its rules are issued.
pub struct CheckPointEnforcer {
    client: Arc<ManagementClient>,
    mode: SamMode,
    action: SamAction,
    /// Block sends that may still be queued on the server: a listing that misses their rules
    /// is not believed until they ran.
    unsettled: Mutex<Unsettled>,
}

#[async_trait]
impl Enforcer for CheckPointEnforcer {
    async fn block(&self, rules: &[&Enforce], gateways: &[String]) -> Result<Answer, Failed> {
        let rules: Vec<SamRule> = rules.iter().map(|e| e.rule).collect();
        match self.mode {
            // One process per rule: each line reports its own exit status.
            SamMode::FwSam => {
                let script =
                    sam::batch_script(&rules, self.mode, Operation::Block).map_err(unrenderable)?;
                let (refs, tasks) = self.send(&script, gateways, &rules).await?;
                Ok(answer(&refs, &tasks, gateways, rules.len()))
            }
            // One `fw samp batch` per family, between two listings of exactly these rules.
            SamMode::FwSamp => {
                let script = sam::samp_batch_script(&rules).map_err(unrenderable)?;
                let (refs, tasks) = self.send(&script, gateways, &rules).await?;
                Ok(Answer {
                    verdicts: rule::samp_batch_verdicts(&refs, &tasks, gateways, &rules),
                    references: refs.iter().map(|r| r.task_id.clone()).collect(),
                })
            }
        }
    }

    async fn verify(&self, enforces: &[&Enforce], gateways: &[String]) -> Result<Verified, Failed> {
        // Taken before the listing: what may still land while it is taken.
        let queued = self.may_still_land(enforces, gateways).await;
        let rules: Vec<SamRule> = enforces.iter().map(|e| e.rule).collect();
        let script = sam::verify_script(&rules, self.mode);
        let (refs, tasks) = self
            .run_script("samgate verify", &script, gateways, rules.len())
            .await?;
        let mut verdicts = rule::verify_verdicts(&refs, &tasks, gateways, &rules, self.mode);
        // Absent, while an earlier send of the rule may still run there, proves nothing yet.
        for (i, per_gateway) in verdicts.iter_mut().enumerate() {
            for (gateway, presence) in per_gateway {
                if *presence == Presence::Absent && queued.contains(&(i, gateway.clone())) {
                    *presence = Presence::Unknown(
                        "not listed yet, but an earlier send of it may still be queued on the \
                         server (its answer was lost or its task unfinished)"
                            .into(),
                    );
                }
            }
        }
        let handles = match self.mode {
            SamMode::FwSamp => rule::listed_uids(&refs, &tasks, &rules)
                .into_iter()
                .map(|by_gateway| {
                    by_gateway
                        .into_iter()
                        .map(|(g, uids)| (g, uids.into_iter().map(Handle::SampUid).collect()))
                        .collect()
                })
                .collect(),
            SamMode::FwSam => vec![Default::default(); rules.len()],
        };
        Ok(Verified { verdicts, handles })
    }

    async fn unblock(
        &self,
        removals: &[Removal<'_>],
        gateways: &[String],
    ) -> Result<Answer, Failed> {
        let rules: Vec<SamRule> = removals.iter().map(|r| r.enforce.rule).collect();
        match self.mode {
            SamMode::FwSam => {
                let script = sam::batch_script(&rules, SamMode::FwSam, Operation::Unblock)
                    .map_err(unrenderable)?;
                let (refs, tasks) = self
                    .run_script("samgate unblock", &script, gateways, rules.len())
                    .await?;
                Ok(answer(&refs, &tasks, gateways, rules.len()))
            }
            // `fw samp del` names uids, which differ per gateway: one script per gateway. A
            // gateway whose call failed is left unknown; the others' answers stand.
            SamMode::FwSamp => {
                let mut all = Answer {
                    verdicts: vec![Vec::new(); rules.len()],
                    references: Vec::new(),
                };
                let mut failure = None;
                for gateway in gateways {
                    let uids: Vec<(sam::SampUid, bool)> = removals
                        .iter()
                        .flat_map(|r| {
                            let ipv6 = r.enforce.rule.criteria.is_ipv6();
                            r.found.get(gateway).into_iter().flatten().map(move |h| {
                                let Handle::SampUid(uid) = h;
                                (uid.clone(), ipv6)
                            })
                        })
                        .collect();
                    let script = sam::samp_delete_script(&uids);
                    let one = std::slice::from_ref(gateway);
                    match self
                        .run_script("samgate unblock", &script, one, rules.len())
                        .await
                    {
                        Ok((refs, tasks)) => {
                            let answer = answer(&refs, &tasks, one, rules.len());
                            all.references.extend(answer.references);
                            for (into, from) in all.verdicts.iter_mut().zip(answer.verdicts) {
                                into.extend(from);
                            }
                        }
                        Err(failed) => {
                            for verdicts in &mut all.verdicts {
                                verdicts.push((
                                    gateway.clone(),
                                    rule::Sent::Unknown(failed.error.to_string()),
                                ));
                            }
                            failure.get_or_insert(failed);
                        }
                    }
                }
                match failure {
                    // No gateway answered: the call failed as a whole.
                    Some(failed) if all.references.is_empty() => Err(failed),
                    _ => Ok(all),
                }
            }
        }
    }

    async fn list(&self, gateways: &[String]) -> Result<Listings, BackendError> {
        let script = listing_script(self.mode, self.action);
        let (refs, tasks) = self
            .run_script("samgate reconcile", &script, gateways, 0)
            .await
            .map_err(|f| f.error)?;
        Ok(listings(self.mode, gateways, &refs, &tasks))
    }

    /// `fw samp del` names each gateway's own uids: one `run-script` per gateway.
    fn unblock_calls(&self, gateways: usize) -> u32 {
        match self.mode {
            SamMode::FwSam => 1,
            SamMode::FwSamp => u32::try_from(gateways).unwrap_or(u32::MAX).max(1),
        }
    }
}

impl CheckPointEnforcer {
    pub fn new(client: Arc<ManagementClient>, mode: SamMode, action: SamAction) -> Self {
        Self {
            client,
            mode,
            action,
            unsettled: Mutex::default(),
        }
    }

    /// A block script that adds `rules`: a send that may have been carried out without an
    /// answer (lost, or its tasks unfinished) is remembered until it surely ran.
    async fn send(
        &self,
        script: &str,
        gateways: &[String],
        rules: &[SamRule],
    ) -> Result<(Vec<TaskRef>, Vec<Task>), Failed> {
        let (answer, tasks) = self
            .run_script_naming_tasks("samgate block", script, gateways, rules.len())
            .await;
        if let Err(failed) = &answer {
            if failed.delivery == Delivery::MaybeSent {
                let keys = rules.iter().filter_map(|r| r.key);
                let mut unsettled = self.unsettled.lock().expect("unsettled");
                // From now, when the answer was given up on: the server may have taken the
                // request at any moment until then.
                unsettled.record(gateways, keys, tasks, Instant::now());
            }
        }
        answer
    }

    /// Which (rule, gateway) pairs an earlier send of this process's may still reach (its
    /// answer lost or its tasks unfinished), once the unsettled sends that ran are forgotten.
    async fn may_still_land(
        &self,
        enforces: &[&Enforce],
        gateways: &[String],
    ) -> HashSet<(usize, String)> {
        self.settle().await;
        let unsettled = self.unsettled.lock().expect("unsettled");
        let mut queued = HashSet::new();
        for (i, enforce) in enforces.iter().enumerate() {
            let Some(key) = enforce.rule.key else {
                continue;
            };
            for gateway in gateways {
                if unsettled.may_land(gateway, &key) {
                    queued.insert((i, gateway.clone()));
                }
            }
        }
        queued
    }

    /// Forgets the unsettled sends that ran: their tasks ended (asked with `show-task`; a task
    /// the server no longer knows counts as ended), or, without tasks to ask about,
    /// `task_timeout` passed.
    async fn settle(&self) {
        let follow = {
            let unsettled = self.unsettled.lock().expect("unsettled");
            if unsettled.is_empty() {
                return;
            }
            unsettled.tasks()
        };
        let mut ended = HashSet::new();
        match self.client.show_tasks(&follow).await {
            Ok(tasks) => ended.extend(
                tasks
                    .into_iter()
                    .filter(|t| t.status.is_terminal())
                    .map(|t| t.task_id),
            ),
            // Any other failure (the server down, say) would fail each question too: they stay
            // unsettled until their time runs out, or the next verify asks again.
            Err(e) if !e.is_not_found() => {}
            // One id the server forgot fails the whole question: ask one by one.
            Err(_) => {
                for id in follow {
                    match self.client.show_tasks(std::slice::from_ref(&id)).await {
                        Ok(tasks) if tasks.iter().all(|t| !t.status.is_terminal()) => {}
                        Ok(_) => {
                            ended.insert(id);
                        }
                        Err(e) if e.is_not_found() => {
                            ended.insert(id);
                        }
                        // Unknown: unsettled until its time runs out.
                        Err(_) => {}
                    }
                }
            }
        }
        let mut unsettled = self.unsettled.lock().expect("unsettled");
        unsettled.settle(Instant::now(), self.client.task_timeout(), &ended);
    }

    async fn run_script(
        &self,
        name: &str,
        script: &str,
        gateways: &[String],
        rules: usize,
    ) -> Result<(Vec<TaskRef>, Vec<Task>), Failed> {
        let (answer, _) = self
            .run_script_naming_tasks(name, script, gateways, rules)
            .await;
        answer
    }

    /// `run-script` to `gateways`, then its tasks to the end. A `run-script` refused before
    /// anything ran leaves the rules as they were; once it was accepted, its script may have run
    /// whatever became of its tasks.
    /// Also returns the ids of the tasks the server named (none when the `run-script` failed).
    async fn run_script_naming_tasks(
        &self,
        name: &str,
        script: &str,
        gateways: &[String],
        rules: usize,
    ) -> (Result<(Vec<TaskRef>, Vec<Task>), Failed>, Vec<String>) {
        let comments = format!("samgate: {rules} rule(s)");
        let request = RunScript {
            name,
            script,
            targets: gateways,
            comments: &comments,
        };
        let mut refs = match self.client.run_script(&request).await {
            Ok(refs) => refs,
            Err(e) => {
                let failed = Failed {
                    delivery: rule::delivery(&e),
                    error: e.into(),
                };
                return (Err(failed), Vec::new());
            }
        };
        let ids: Vec<String> = refs.iter().map(|r| r.task_id.clone()).collect();
        match self.client.wait_tasks(&ids).await {
            Ok(tasks) => {
                settle_targets(&mut refs, &tasks, name, gateways);
                (Ok((refs, tasks)), ids)
            }
            // A task that timed out is what it is; any other polling failure leaves it unknown.
            Err(e @ ApiError::TaskTimeout { .. }) => (Err(Failed::maybe_sent(e)), ids),
            Err(e) => {
                let unfollowed = BackendError::Unfollowed(Box::new(e.into()));
                (Err(Failed::maybe_sent(unfollowed)), ids)
            }
        }
    }
}

/// A rule the target's command form cannot express: refused before anything ran.
fn unrenderable(e: sam::RenderError) -> Failed {
    Failed::not_sent(BackendError::Unrenderable(e.to_string()))
}

fn answer(refs: &[TaskRef], tasks: &[Task], gateways: &[String], rules: usize) -> Answer {
    Answer {
        verdicts: rule::send_verdicts(refs, tasks, gateways, rules),
        references: refs.iter().map(|r| r.task_id.clone()).collect(),
    }
}

/// Reads a listing script's output (its sections: IPv4, then IPv6); nothing is concluded when a
/// section is missing, the IPv4 query failed or a line cannot be read (the error says which).
/// When only the IPv6 query failed (`fw6` on a gateway with IPv6 turned off), the IPv4 rules
/// are still judged: [`Listing::Ipv4Only`].
pub fn parse_listing(mode: SamMode, output: &str) -> Result<Listing, String> {
    let mut sections = sam::split_sections(output, 2).into_iter();
    let (ipv4, ipv6) = (sections.next().flatten(), sections.next().flatten());
    let text = match (ipv4, &ipv6) {
        (None, _) => return Err("the IPv4 listing was cut".into()),
        (_, None) => return Err("the IPv6 listing was cut".into()),
        (Some((0, ipv4)), Some((0, ipv6))) => ipv4 + ipv6,
        (Some((0, ipv4)), Some(_)) => ipv4,
        (Some((status, _)), _) => {
            return Err(format!("the IPv4 listing failed with exit status {status}"))
        }
    };
    let listing = parse_listing_text(mode, &text)?;
    Ok(match ipv6 {
        Some((0, _)) => listing,
        _ => Listing::Ipv4Only(Box::new(listing)),
    })
}

fn parse_listing_text(mode: SamMode, text: &str) -> Result<Listing, String> {
    let unreadable = |u: sam::Unreadable| format!("the listing has {u}");
    Ok(match mode {
        SamMode::FwSamp => Listing::Samp(
            sam::parse_samp_get(text)
                .map_err(unreadable)?
                .into_iter()
                .filter_map(|e| {
                    let key = e.samgate_key()?;
                    let ip = ["src_ip_addr", "dst_ip_addr"]
                        .iter()
                        .find_map(|f| e.fields.get(*f)?.parse().ok());
                    Some((key, ip))
                })
                .collect(),
        ),
        SamMode::FwSam => Listing::Sam(sam::parse_sam_monitor(text).map_err(unreadable)?),
    })
}

/// The script that lists a target's rules on a gateway: IPv4, then IPv6, each followed by the
/// outcome marker.
pub fn listing_script(mode: SamMode, action: SamAction) -> String {
    let queries = match mode {
        SamMode::FwSamp => [sam::fw_samp_get(false), sam::fw_samp_get(true)],
        SamMode::FwSam => {
            let class = match action {
                SamAction::Drop => "-j",
                SamAction::Reject => "-i",
                SamAction::Notify => "-n",
            };
            [
                format!("fw sam -M {class} all 2>&1"),
                format!("fw6 sam -M {class} all 2>&1"),
            ]
        }
    };
    let mut script = String::from("# samgate: reconcile\n");
    for (i, query) in queries.iter().enumerate() {
        script.push_str(&format!(
            "{query}; echo \"{} {i} $?\"\n",
            sam::OUTCOME_MARKER
        ));
    }
    script
}

/// Per gateway, its listing, from a listing script's tasks; gateways whose listing could not be
/// read are named in the errors.
pub fn listings(
    mode: SamMode,
    gateways: &[String],
    refs: &[TaskRef],
    tasks: &[Task],
) -> (BTreeMap<String, Listing>, Vec<String>) {
    let outputs = rule::task_outputs(refs, tasks);
    let mut found = BTreeMap::new();
    let mut errors = Vec::new();
    for gateway in gateways {
        match outputs.get(gateway) {
            Some(Ok(output)) => match parse_listing(mode, output) {
                Ok(listing) => {
                    found.insert(gateway.clone(), listing);
                }
                Err(why) => errors.push(format!("{gateway}: {why}")),
            },
            Some(Err(why)) => errors.push(format!("{gateway}: {why}")),
            None => errors.push(format!("{gateway}: no task")),
        }
    }
    (found, errors)
}
