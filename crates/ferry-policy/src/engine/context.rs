//! The Cedar request and the small per-request entity store built from a
//! [`Request`]: what policies can see.

use std::collections::{BTreeSet, HashMap, HashSet};

use cedar_policy::{Context, Entities, Entity, EntityId, EntityUid, RestrictedExpression};

use super::PolicyEngine;
use crate::types::{Principal, Request, VmLabels};

fn strings<'a>(v: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        v.into_iter().map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

/// The attributes a VM declares, as Cedar record fields (the `Vm` entity and
/// each `Resident` carry the same ones).
fn label_fields(l: &VmLabels) -> Vec<(String, RestrictedExpression)> {
    vec![
        ("tenant".to_owned(), RestrictedExpression::new_string(l.tenant.clone())),
        ("security_level".to_owned(), RestrictedExpression::new_long(i64::from(l.security_level))),
        ("allowed_zones".to_owned(), strings(&l.allowed_zones)),
        ("anti_affinity".to_owned(), strings(&l.anti_affinity)),
    ]
}

impl PolicyEngine {
    /// Builds the Cedar request and the small per-request entity store:
    /// principal, both hosts and the VM. Only these are reachable from the
    /// request (the schema has no other entity-typed attributes), so copying
    /// the whole store per decision would buy nothing; a policy naming some
    /// other entity literally fails to evaluate and therefore denies.
    pub(super) fn build(
        &self,
        req: &Request,
        principal: Entity,
        source: Entity,
        destination: Entity,
    ) -> Result<(cedar_policy::Request, Entities), String> {
        let vm_uid =
            EntityUid::from_type_name_and_id(self.names.vm.clone(), EntityId::new(req.vm.as_str()));
        let vm = Entity::new(
            vm_uid.clone(),
            label_fields(&req.labels).into_iter().collect::<HashMap<_, _>>(),
            HashSet::new(),
        )
        .map_err(|e| format!("VM labels cannot be represented: {e}"))?;

        let residents = req
            .resident_on_destination
            .iter()
            .map(|r| {
                let mut fields = label_fields(&r.labels);
                fields.push((
                    "name".to_owned(),
                    RestrictedExpression::new_string(r.name.as_str().to_owned()),
                ));
                RestrictedExpression::new_record(fields)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("resident VM list cannot be represented: {e}"))?;
        let on_destination = || req.resident_on_destination.iter().map(|r| &r.labels);
        let resident_tenants: BTreeSet<&String> = on_destination().map(|l| &l.tenant).collect();
        // Cedar has no quantifiers: "some resident excludes this tenant" is
        // `context.resident_anti_affinity.contains(resource.tenant)`.
        let resident_anti_affinity: BTreeSet<&String> =
            on_destination().flat_map(|l| &l.anti_affinity).collect();
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
            ("resident_tenants".to_owned(), strings(resident_tenants)),
            ("resident_anti_affinity".to_owned(), strings(resident_anti_affinity)),
            ("residents".to_owned(), RestrictedExpression::new_set(residents)),
        ])
        .map_err(|e| format!("request context cannot be built: {e}"))?;

        let principal_uid = principal.uid();
        // The principal may be one of the hosts (SendVm / ReceiveVm / StartVm),
        // and for StartVm both hosts are the same; Cedar refuses duplicate
        // entities, so add each uid once.
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
