"""harvest: ASR corpora in their own layouts -> one transcripts table and a rejects table.

``stage`` the contract; ``driver`` the run; ``corpora`` one reader per layout; ``admission`` what is decided
without opening audio; ``probe`` the per-file work in worker processes; ``previous`` the previous run's
table, for reruns; ``pseudolabel`` Whisper transcripts for audio without one.
"""
