"""Pure scheduling logic: no Ray, no SQL, no ZooKeeper, no sleeping.

Time is always passed in (``now=``), so every rule here is a table test.
"""
