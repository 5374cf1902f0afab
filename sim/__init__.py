"""Load simulator for qlib-server: many fake Qlib clients, real pyqlib clients, and a verifier of every answer."""
