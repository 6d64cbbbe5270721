"""Settings shared by every test."""

from worker import amqp_compat

# The test process speaks AMQP through the same lenient codecs as the worker: it reads back
# whatever the worker copied into a dead letter, and its publishers can send the raw bytes a
# careless producer would (a str decoded with surrogateescape goes out as those bytes).
amqp_compat.install()
