"""`dr demo`: the offline end-to-end demo; its config `demo.yaml` ships inside the package."""
