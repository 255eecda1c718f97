"""The `model.py` of each python-backend Triton model; `generator.serving.render` copies them into `<repo>/<model>/1/`.

They run inside Triton's python stub and import `triton_python_backend_utils`; `common` holds their testable helpers.
"""
