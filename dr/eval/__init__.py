"""After search: metrics (`metrics`, `dr eval` in `evaluate`), run conversion (`convert`) and
hard-negative mining from a run (`mine`)."""
