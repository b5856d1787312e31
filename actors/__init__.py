"""Ray actors, each a thin `@ray.remote` over a plain class: Replica, Coordinator, Join."""
