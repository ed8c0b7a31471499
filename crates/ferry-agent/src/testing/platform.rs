//! A pretend TPM: its "quote" carries the host's name and the qualifying
//! data in the clear, and verification checks both, so a quote made for
//! another connection, migration or role still fails as a relayed one
//! would. A test can mark a platform tampered (a PCR off its reference).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use ferry_attest::Evidence;
use ferry_types::HostName;

use crate::attestation::Platform;

pub struct FakeTpm {
    host: HostName,
    pub tampered: Arc<AtomicBool>,
}

impl FakeTpm {
    pub fn new(host: HostName) -> Self {
        Self { host, tampered: Arc::new(AtomicBool::new(false)) }
    }
}

#[async_trait]
impl Platform for FakeTpm {
    async fn quote(&self, qualifying_data: [u8; 32]) -> Result<Evidence, String> {
        let mut attest = self.host.as_str().as_bytes().to_vec();
        attest.push(0);
        attest.extend_from_slice(&qualifying_data);
        let pcr7 = u8::from(self.tampered.load(Ordering::Relaxed));
        Ok(Evidence { attest, signature: vec![0], pcrs: BTreeMap::from([(7, [pcr7; 32])]) })
    }

    fn verify(
        &self,
        peer: &HostName,
        evidence: &Evidence,
        qd: &[u8; 32],
    ) -> Result<Vec<u8>, String> {
        let mut want = peer.as_str().as_bytes().to_vec();
        want.push(0);
        want.extend_from_slice(qd);
        if evidence.attest != want {
            return Err(format!("{peer}: quote is not bound to this channel, migration and role"));
        }
        if evidence.pcrs.get(&7) != Some(&[0; 32]) {
            return Err(format!("{peer}: PCR 7 differs from its reference value"));
        }
        Ok(vec![7])
    }
}
