"""C++ sources of gsae's torch extension (built on first use by ``gsae.angular``)."""
