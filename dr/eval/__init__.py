"""After search: metrics and the one metrics table (`metrics`, `dr eval` in `eval_cli`) and run conversion
(`dr convert` in `convert_cli`)."""
