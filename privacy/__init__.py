"""The DP library: the q/steps/σ rule and the DP trainer (`engine`), per-student clipping, the school's
policy, the accountant, the budget guard, the signed ledger and the audits. Imports only shared_models
(tests/test_architecture.py); docs/privacy.md says what the guarantee covers."""
