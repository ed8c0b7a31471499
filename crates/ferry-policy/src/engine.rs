//! The Cedar-backed decision engine, its atomic reload wrapper, and the
//! `ferry policy check` entry point.

mod context;
mod explain;
mod residents;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Schema,
};

use crate::error::PolicyError;
use crate::load::{self, PolicyMeta};
use crate::types::{Action, Decision, Principal, Request};
use explain::who;

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
    start: EntityUid,
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
            start: act(Action::StartVm.cedar_name()),
        })
    }

    fn action(&self, a: Action) -> &EntityUid {
        match a {
            Action::MigrateVm => &self.migrate,
            Action::SendVm => &self.send,
            Action::ReceiveVm => &self.receive,
            Action::StartVm => &self.start,
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

/// What Cedar said about one request, before Ferry makes it a [`Decision`].
struct Verdict {
    allowed: bool,
    /// Ids of the policies that determined it, in file order.
    matched: Vec<String>,
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
        Outcome {
            decision: Decision::Deny { reason, policies: Vec::new(), residents: Vec::new() },
            errors: Vec::new(),
        }
    }

    fn known(&self, ty: &EntityTypeName, name: &str) -> Option<Entity> {
        let uid = EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(name));
        self.entities.get(&uid).cloned()
    }

    /// Asks Cedar. `Err` is a reason to deny before Cedar is consulted
    /// (unknown principal or host, a request that does not fit the schema).
    fn run(&self, req: &Request) -> Result<Verdict, String> {
        let principal = match &req.principal {
            Principal::Operator { name, .. } => self.known(&self.names.operator, name.as_str()),
            Principal::Host { name } => self.known(&self.names.host, name.as_str()),
        };
        let Some(principal) = principal else {
            return Err(format!(
                "{} is not in the entities file (unknown principals are denied)",
                who(&req.principal)
            ));
        };
        let Some(source) = self.known(&self.names.host, req.source.as_str()) else {
            return Err(format!("source host `{}` is not in the entities file", req.source));
        };
        let Some(destination) = self.known(&self.names.host, req.destination.as_str()) else {
            return Err(format!(
                "destination host `{}` is not in the entities file",
                req.destination
            ));
        };
        let (request, entities) = self.build(req, principal, source, destination)?;
        let response = self.authorizer.is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        let mut matched: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
        matched.sort_by_key(|id| self.order.iter().position(|o| o == id));
        Ok(Verdict {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            matched,
            errors: diagnostics.errors().map(|e| e.to_string()).collect(),
        })
    }

    fn evaluate(&self, req: &Request) -> Outcome {
        if let Some(problem) = req.labels.problem() {
            return Self::deny(problem);
        }
        let Verdict { allowed, matched, errors } = match self.run(req) {
            Ok(v) => v,
            Err(why) => return Self::deny(why),
        };
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
                    residents: Vec::new(),
                },
                errors,
            };
        }
        let decision = if allowed {
            Decision::Allow { policies: matched }
        } else if !matched.is_empty() {
            let blame = self.blame(req, &matched);
            let why: Vec<String> = matched
                .iter()
                .zip(&blame)
                .map(|(id, b)| {
                    let reason = self.meta.get(id).and_then(|m| m.reason.clone());
                    let parts: Vec<String> =
                        reason.into_iter().chain(residents::blame_clause(req, b)).collect();
                    if parts.is_empty() {
                        format!("`{id}`")
                    } else {
                        format!("`{id}` ({})", parts.join("; "))
                    }
                })
                .collect();
            Decision::Deny {
                reason: format!("forbidden by {}", why.join(", ")),
                residents: residents::blamed_names(req, &blame),
                policies: matched,
            }
        } else {
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
                residents: Vec::new(),
            }
        };
        Outcome { decision, errors }
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
