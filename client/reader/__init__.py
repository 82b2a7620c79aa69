"""The reader web page: drop a head CT, see ICH/PHE overlays, volumes, densities and the prediction.

``app.create_app`` builds the FastAPI backend; ``render`` turns slices and labels into PNGs;
``upload`` streams uploads into a per-case temporary folder; ``cases`` queues cases on one worker.
"""
