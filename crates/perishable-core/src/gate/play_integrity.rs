//! Google Play Integrity verdicts, decrypted and verified locally (in progress).
