//! The Cedar-backed decision engine, its atomic reload wrapper, and the
//! `ferry policy check` entry point.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet,
    RestrictedExpression, Schema,
};

use crate::error::PolicyError;
use crate::load::{self, PolicyMeta};
use crate::types::{Action, Decision, Principal, Request};

/// Whether a policy permits or forbids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEffect {
    Permit,
    Forbid,
}

impl fmt::Display for PolicyEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyEffect::Permit => "permit",
            PolicyEffect::Forbid => "forbid",
        })
    }
}

/// One loaded policy, as shown by `ferry policy check` and `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    /// The `@id` annotation (or `<file>#<index>` without one).
    pub id: String,
    pub effect: PolicyEffect,
    pub file: PathBuf,
    /// The `@reason` annotation.
    pub reason: Option<String>,
}

/// Result of `ferry policy check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub files: Vec<PathBuf>,
    pub policies: Vec<PolicyInfo>,
    /// Entities in the entities file (actions excluded), when one was given.
    pub entities: Option<usize>,
    /// Validator warnings; they do not make the check fail.
    pub warnings: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let permits = self.policies.iter().filter(|p| p.effect == PolicyEffect::Permit).count();
        writeln!(
            f,
            "ok: {} file(s), {} policies ({permits} permit, {} forbid)",
            self.files.len(),
            self.policies.len(),
            self.policies.len() - permits
        )?;
        for p in &self.policies {
            writeln!(f, "  {:<6} {}  ({})", p.effect, p.id, p.file.display())?;
        }
        if let Some(n) = self.entities {
            writeln!(f, "entities: {n}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

fn infos(order: &[String], meta: &HashMap<String, PolicyMeta>) -> Vec<PolicyInfo> {
    order
        .iter()
        .filter_map(|id| {
            meta.get(id).map(|m| PolicyInfo {
                id: id.clone(),
                effect: effect_of(m.effect),
                file: m.file.clone(),
                reason: m.reason.clone(),
            })
        })
        .collect()
}

fn effect_of(e: Effect) -> PolicyEffect {
    match e {
        Effect::Permit => PolicyEffect::Permit,
        Effect::Forbid => PolicyEffect::Forbid,
    }
}

/// Entity type names and action ids, parsed once at load so a decision does
/// no string parsing of its own.
struct Names {
    operator: EntityTypeName,
    host: EntityTypeName,
    vm: EntityTypeName,
    migrate: EntityUid,
    send: EntityUid,
    receive: EntityUid,
}

impl Names {
    fn new() -> Result<Self, PolicyError> {
        let ty =
            |s: &str| EntityTypeName::from_str(s).map_err(|e| PolicyError::Schema(e.to_string()));
        let action = ty("Action")?;
        let act =
            |name: &str| EntityUid::from_type_name_and_id(action.clone(), EntityId::new(name));
        Ok(Names {
            operator: ty("Operator")?,
            host: ty("Host")?,
            vm: ty("Vm")?,
            migrate: act(Action::MigrateVm.cedar_name()),
            send: act(Action::SendVm.cedar_name()),
            receive: act(Action::ReceiveVm.cedar_name()),
        })
    }

    fn action(&self, a: Action) -> &EntityUid {
        match a {
            Action::MigrateVm => &self.migrate,
            Action::SendVm => &self.send,
            Action::ReceiveVm => &self.receive,
        }
    }
}

/// Schema, validated policies and entities: everything a decision needs.
/// Immutable once loaded; replace it whole (see [`SharedPolicy`]).
pub struct PolicyEngine {
    schema: Schema,
    policies: PolicySet,
    meta: HashMap<String, PolicyMeta>,
    order: Vec<String>,
    entities: Entities,
    authorizer: Authorizer,
    names: Names,
    warnings: Vec<String>,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine").field("policies", &self.order).finish_non_exhaustive()
    }
}

/// Internal outcome: the decision plus what `explain` wants to show.
struct Outcome {
    decision: Decision,
    errors: Vec<String>,
}

impl PolicyEngine {
    /// Loads and checks policy files and the entities file. A syntax error or
    /// schema violation names file, line and column.
    pub fn load(
        policy_files: &[PathBuf],
        entities_file: &Path,
    ) -> Result<PolicyEngine, PolicyError> {
        let schema = load::schema()?;
        let loaded = load::load_policies(policy_files, &schema)?;
        let entities = load::load_entities(entities_file, &schema)?;
        Ok(PolicyEngine {
            names: Names::new()?,
            schema,
            policies: loaded.set,
            meta: loaded.meta,
            order: loaded.order,
            entities,
            authorizer: Authorizer::new(),
            warnings: loaded.warnings,
        })
    }

    /// The loaded policies, in file order.
    pub fn policies(&self) -> Vec<PolicyInfo> {
        infos(&self.order, &self.meta)
    }

    /// Validator warnings from load (never fatal).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Decides a request. Default deny: allowed only if a permit matches and
    /// no forbid does; unknown principals or hosts, out-of-range labels and
    /// policy evaluation errors all deny.
    pub fn authorize(&self, req: &Request) -> Decision {
        self.evaluate(req).decision
    }

    /// The decision, the request as policy saw it, and every policy that
    /// mattered, as text for `ferry policy explain`.
    pub fn explain(&self, req: &Request) -> String {
        let outcome = self.evaluate(req);
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            out,
            "decision: {}",
            if outcome.decision.is_allow() { "ALLOW" } else { "DENY" }
        );
        let _ = writeln!(
            out,
            "request:  {} {} VM `{}` from `{}` to `{}`{}",
            who(&req.principal),
            req.action,
            req.vm,
            req.source,
            req.destination,
            if req.postcopy { " (post-copy)" } else { "" }
        );
        let l = &req.labels;
        let _ = writeln!(
            out,
            "labels:   tenant `{}`, security level {}, allowed zones [{}], anti-affinity [{}]",
            l.tenant,
            l.security_level,
            l.allowed_zones.join(", "),
            l.anti_affinity.join(", ")
        );
        for (role, host) in [("source", &req.source), ("destination", &req.destination)] {
            let _ = writeln!(out, "{:<10}{}", format!("{role}:"), self.describe_host(host));
        }
        if !req.resident_on_destination.is_empty() {
            let tenants: BTreeSet<&str> =
                req.resident_on_destination.iter().map(|r| r.tenant.as_str()).collect();
            let _ = writeln!(
                out,
                "resident: {} VM(s) on the destination, tenants [{}]",
                req.resident_on_destination.len(),
                tenants.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        if let Decision::Deny { reason, .. } = &outcome.decision {
            let _ = writeln!(out, "reason:   {reason}");
        }
        let decided = outcome.decision.policies();
        if !decided.is_empty() {
            let _ = writeln!(out, "decided by:");
            for id in decided {
                let _ = writeln!(out, "  {}", self.describe_policy(id));
            }
        }
        if !outcome.decision.is_allow() && decided.is_empty() {
            let candidates = self.permits_for(req.action);
            if !candidates.is_empty() {
                let _ = writeln!(out, "permit policies for {} (none matched):", req.action);
                for id in candidates {
                    let _ = writeln!(out, "  {}", self.describe_policy(&id));
                }
            }
        }
        for e in &outcome.errors {
            let _ = writeln!(out, "error:    {e}");
        }
        out
    }

    fn describe_host(&self, host: &ferry_types::HostName) -> String {
        let uid =
            EntityUid::from_type_name_and_id(self.names.host.clone(), EntityId::new(host.as_str()));
        match self.entities.get(&uid) {
            None => format!("`{host}`: not in the entities file"),
            Some(e) => {
                let attr = |k: &str| match e.attr(k) {
                    Some(Ok(v)) => v.to_string(),
                    _ => "?".to_owned(),
                };
                format!("`{host}`: zone {}, trust level {}", attr("zone"), attr("trust_level"))
            }
        }
    }

    fn describe_policy(&self, id: &str) -> String {
        match self.meta.get(id) {
            Some(m) => format!(
                "{} {id} ({}){}",
                effect_of(m.effect),
                m.file.display(),
                m.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            ),
            None => id.to_owned(),
        }
    }

    /// Ids of permit policies whose scope includes `action`, in file order.
    fn permits_for(&self, action: Action) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| {
                self.meta.get(*id).is_some_and(|m| {
                    m.effect == Effect::Permit
                        && m.actions
                            .as_ref()
                            .is_none_or(|a| a.iter().any(|n| n == action.cedar_name()))
                })
            })
            .cloned()
            .collect()
    }

    fn deny(reason: String) -> Outcome {
        Outcome { decision: Decision::Deny { reason, policies: Vec::new() }, errors: Vec::new() }
    }

    fn known(&self, ty: &EntityTypeName, name: &str) -> Option<Entity> {
        let uid = EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(name));
        self.entities.get(&uid).cloned()
    }

    fn evaluate(&self, req: &Request) -> Outcome {
        if let Some(problem) = req.labels.problem() {
            return Self::deny(problem);
        }
        let principal = match &req.principal {
            Principal::Operator { name, .. } => self.known(&self.names.operator, name.as_str()),
            Principal::Host { name } => self.known(&self.names.host, name.as_str()),
        };
        let Some(principal) = principal else {
            return Self::deny(format!(
                "{} is not in the entities file (unknown principals are denied)",
                who(&req.principal)
            ));
        };
        let Some(source) = self.known(&self.names.host, req.source.as_str()) else {
            return Self::deny(format!("source host `{}` is not in the entities file", req.source));
        };
        let Some(destination) = self.known(&self.names.host, req.destination.as_str()) else {
            return Self::deny(format!(
                "destination host `{}` is not in the entities file",
                req.destination
            ));
        };
        let cedar_request = match self.build(req, principal, source, destination) {
            Ok(r) => r,
            Err(why) => return Self::deny(why),
        };
        let (request, entities) = cedar_request;
        let response = self.authorizer.is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        let mut matched: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
        matched.sort_by_key(|id| self.order.iter().position(|o| o == id));
        let errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();

        // Cedar skips a policy whose evaluation errors. For a forbid that
        // would turn an error into an allow, so any error denies.
        if !errors.is_empty() {
            return Outcome {
                decision: Decision::Deny {
                    reason: format!(
                        "policy evaluation failed, denying to be safe: {}",
                        errors.join("; ")
                    ),
                    policies: Vec::new(),
                },
                errors,
            };
        }
        let decision = match response.decision() {
            cedar_policy::Decision::Allow => Decision::Allow { policies: matched },
            cedar_policy::Decision::Deny if !matched.is_empty() => {
                let why: Vec<String> = matched
                    .iter()
                    .map(|id| match self.meta.get(id).and_then(|m| m.reason.as_deref()) {
                        Some(r) => format!("`{id}` ({r})"),
                        None => format!("`{id}`"),
                    })
                    .collect();
                Decision::Deny {
                    reason: format!("forbidden by {}", why.join(", ")),
                    policies: matched,
                }
            }
            cedar_policy::Decision::Deny => {
                let candidates = self.permits_for(req.action);
                let tail = if candidates.is_empty() {
                    format!("no permit policy covers {}", req.action)
                } else {
                    format!("none of the permit policies matched: {}", candidates.join(", "))
                };
                Decision::Deny {
                    reason: format!(
                        "no policy permits {} to {} VM `{}` of tenant `{}` to `{}` ({tail})",
                        who(&req.principal),
                        req.action,
                        req.vm,
                        req.labels.tenant,
                        req.destination
                    ),
                    policies: Vec::new(),
                }
            }
        };
        Outcome { decision, errors }
    }

    /// Builds the Cedar request and the small per-request entity store:
    /// principal, both hosts and the VM. Only these are reachable from the
    /// request (the schema has no other entity-typed attributes), so copying
    /// the whole store per decision would buy nothing; a policy naming some
    /// other entity literally fails to evaluate and therefore denies.
    fn build(
        &self,
        req: &Request,
        principal: Entity,
        source: Entity,
        destination: Entity,
    ) -> Result<(cedar_policy::Request, Entities), String> {
        let l = &req.labels;
        let strings = |v: &[String]| {
            RestrictedExpression::new_set(
                v.iter().map(|s| RestrictedExpression::new_string(s.clone())),
            )
        };
        let vm_uid =
            EntityUid::from_type_name_and_id(self.names.vm.clone(), EntityId::new(req.vm.as_str()));
        let vm = Entity::new(
            vm_uid.clone(),
            HashMap::from([
                ("tenant".to_owned(), RestrictedExpression::new_string(l.tenant.clone())),
                (
                    "security_level".to_owned(),
                    RestrictedExpression::new_long(i64::from(l.security_level)),
                ),
                ("allowed_zones".to_owned(), strings(&l.allowed_zones)),
                ("anti_affinity".to_owned(), strings(&l.anti_affinity)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("VM labels cannot be represented: {e}"))?;

        let residents = req
            .resident_on_destination
            .iter()
            .map(|r| {
                RestrictedExpression::new_record([
                    ("tenant".to_owned(), RestrictedExpression::new_string(r.tenant.clone())),
                    (
                        "security_level".to_owned(),
                        RestrictedExpression::new_long(i64::from(r.security_level)),
                    ),
                ])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("resident VM list cannot be represented: {e}"))?;
        let resident_tenants: BTreeSet<&str> =
            req.resident_on_destination.iter().map(|r| r.tenant.as_str()).collect();
        let role = match &req.principal {
            Principal::Operator { role, .. } => role.clone(),
            Principal::Host { .. } => String::new(),
        };
        let context = Context::from_pairs([
            ("source".to_owned(), RestrictedExpression::new_entity_uid(source.uid())),
            ("destination".to_owned(), RestrictedExpression::new_entity_uid(destination.uid())),
            ("postcopy".to_owned(), RestrictedExpression::new_bool(req.postcopy)),
            ("source_attested".to_owned(), RestrictedExpression::new_bool(req.source_attested)),
            (
                "destination_attested".to_owned(),
                RestrictedExpression::new_bool(req.destination_attested),
            ),
            ("now".to_owned(), RestrictedExpression::new_long(req.now_unix)),
            ("role".to_owned(), RestrictedExpression::new_string(role)),
            (
                "resident_tenants".to_owned(),
                RestrictedExpression::new_set(
                    resident_tenants
                        .into_iter()
                        .map(|t| RestrictedExpression::new_string(t.to_owned())),
                ),
            ),
            ("residents".to_owned(), RestrictedExpression::new_set(residents)),
        ])
        .map_err(|e| format!("request context cannot be built: {e}"))?;

        let principal_uid = principal.uid();
        // The principal may be one of the hosts (SendVm / ReceiveVm); Cedar
        // refuses duplicate entities, so add each uid once.
        let mut store: Vec<Entity> = Vec::with_capacity(4);
        for e in [principal, source, destination, vm] {
            if !store.iter().any(|s| s.uid() == e.uid()) {
                store.push(e);
            }
        }
        // With the schema, Cedar checks the VM entity's attribute types and
        // adds the action entities that `action in [...]` needs.
        let entities = Entities::from_entities(store, Some(&self.schema))
            .map_err(|e| format!("request entities do not fit the schema: {e}"))?;
        let request = cedar_policy::Request::new(
            principal_uid,
            self.names.action(req.action).clone(),
            vm_uid,
            context,
            Some(&self.schema),
        )
        .map_err(|e| format!("request does not fit the schema: {e}"))?;
        Ok((request, entities))
    }
}

fn who(p: &Principal) -> String {
    match p {
        Principal::Operator { name, role } => format!("operator `{name}` acting as `{role}`"),
        Principal::Host { name } => format!("host `{name}`"),
    }
}

/// The engine in force, replaceable atomically. Readers take an `Arc` to the
/// current engine, so a reload never changes a decision half-way through.
pub struct SharedPolicy {
    current: RwLock<Arc<PolicyEngine>>,
}

impl SharedPolicy {
    pub fn new(engine: PolicyEngine) -> Self {
        SharedPolicy { current: RwLock::new(Arc::new(engine)) }
    }

    pub fn current(&self) -> Arc<PolicyEngine> {
        // The lock only guards an Arc swap, which cannot be left half done,
        // so a poisoned lock still holds a valid engine.
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Loads a new engine and swaps it in only if it loads completely; on
    /// error the old engine stays in force and the error says why.
    pub fn reload(&self, files: &[PathBuf], entities: &Path) -> Result<(), PolicyError> {
        let engine = Arc::new(PolicyEngine::load(files, entities)?);
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = engine;
        Ok(())
    }
}

/// `ferry policy check`: parses and validates the policy files (and the
/// entities file if given) against the schema without building an engine.
pub fn check_files(
    policy_files: &[PathBuf],
    entities_file: Option<&Path>,
) -> Result<Summary, PolicyError> {
    let schema = load::schema()?;
    let loaded = load::load_policies(policy_files, &schema)?;
    let entities = match entities_file {
        Some(path) => {
            let entities = load::load_entities(path, &schema)?;
            Some(entities.iter().filter(|e| e.uid().type_name().to_string() != "Action").count())
        }
        None => None,
    };
    Ok(Summary {
        files: policy_files.to_vec(),
        policies: infos(&loaded.order, &loaded.meta),
        entities,
        warnings: loaded.warnings,
    })
}
