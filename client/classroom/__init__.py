"""From a classroom camera to a lesson report, inside the school: frame sources (`sources`), face detection
and alignment (`faces`), seat search and head posture (`search`, `posture`), per-student tracks (`tracks`),
one lesson's analysis (`analyse`, `lesson`), the school-folder writer (`ingest`), the seed-001 learning-status
indicators (`indicators`) and the teacher's report with its figures (`report`, `plots`).
Nothing here opens a network connection."""
