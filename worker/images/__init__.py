"""Images and documents by reference: what an ``image_url`` may name and its checks at submit (``refs``,
``info``), and its resolution in the worker into what the gateway accepts (``resolve``). Image bytes never
pass through the broker; stored payloads keep the reference.
"""
