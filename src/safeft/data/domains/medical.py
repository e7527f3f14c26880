"""Dosage-style arithmetic exercises: weight-based doses, unit conversions, rates, BMI, totals.

Every prompt is framed as a calculation exercise with invented numbers; nothing here is advice about a
real person, and the checker only scores the arithmetic.
"""

from __future__ import annotations

import random

from safeft.data.domains.base import DOMAINS, Item, NumericDomain, fmt, plural

_MEDICINES = ("a medicine", "an antibiotic", "a pain reliever", "a study drug", "an anti-nausea drug")
_TIMES_A_DAY = {1: "once a day", 2: "twice a day", 3: "three times a day", 4: "four times a day"}


def weight_dose(rng: random.Random) -> Item:
    per_kg = rng.choice((0.5, 1, 2, 3, 4, 5, 10, 15, 20, 25))
    weight = rng.randrange(10, 121, 5)
    dose = per_kg * weight
    template = rng.choice(
        (
            "{M} is dosed at {r} mg per kg of body weight. What dose in mg does a {w} kg person need?",
            "Dosage exercise: {r} mg/kg for a body weight of {w} kg. How many mg is that?",
            "If {m} is given at {r} mg/kg, how many milligrams make one dose for a {w} kg patient?",
            "Calculate the dose in mg for {m} at {r} mg/kg and a body weight of {w} kg.",
        )
    )
    medicine = rng.choice(_MEDICINES)
    prompt = template.format(M=medicine[0].upper() + medicine[1:], m=medicine, r=fmt(per_kg), w=weight)
    working = f"{fmt(per_kg)} mg/kg * {weight} kg = {fmt(dose)} mg."
    return Item("weight_dose", prompt, working, fmt(dose))


def weight_conversion(rng: random.Random) -> Item:
    if rng.random() < 0.5:
        # Multiples of 5 kg are whole pounds at 2.2 lb/kg, so the lb -> kg direction divides evenly.
        kg = rng.randrange(5, 151, 5)
        lb = round(kg * 2.2)
        template = rng.choice(
            (
                "Convert {lb} lb to kilograms, using 2.2 lb per kg.",
                "A body weight is recorded as {lb} lb. What is it in kg (1 kg = 2.2 lb)?",
                "Using 1 kg = 2.2 lb, how many kilograms is {lb} pounds?",
                "Unit conversion exercise: {lb} lb equals how many kg, taking 2.2 lb per kg?",
            )
        )
        return Item("weight_conversion", template.format(lb=lb), f"{lb} / 2.2 = {kg} kg.", str(kg))
    kg = rng.randint(2, 150)
    lb = kg * 2.2
    template = rng.choice(
        (
            "Convert {kg} kg to pounds, using 2.2 lb per kg.",
            "A body weight is recorded as {kg} kg. What is it in lb (1 kg = 2.2 lb)?",
            "Using 1 kg = 2.2 lb, how many pounds is {kg} kilograms?",
            "Unit conversion exercise: {kg} kg equals how many lb, taking 2.2 lb per kg?",
        )
    )
    return Item("weight_conversion", template.format(kg=kg), f"{kg} * 2.2 = {fmt(lb, 1)} lb.", fmt(lb, 1))


def mass_units(rng: random.Random) -> Item:
    kind = rng.randrange(3)
    if kind == 0:
        grams = rng.choice((0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.2, 1.5, 2, 2.5, 3, 4, 5))
        value, unit_from, unit_to, factor = grams, "g", "mg", 1000.0
    elif kind == 1:
        mg = rng.randrange(50, 5001, 50)
        value, unit_from, unit_to, factor = mg, "mg", "g", 0.001
    else:
        mg = rng.choice((0.05, 0.1, 0.125, 0.2, 0.25, 0.4, 0.5, 0.75, 1, 1.5, 2, 2.5, 5))
        value, unit_from, unit_to, factor = mg, "mg", "mcg", 1000.0
    result = value * factor
    template = rng.choice(
        (
            "How many {to} are in {v} {frm}?",
            "Convert {v} {frm} to {to}.",
            "A tablet contains {v} {frm} of active ingredient. How much is that in {to}?",
            "Unit conversion exercise: express {v} {frm} in {to}.",
        )
    )
    prompt = template.format(to=unit_to, v=fmt(value), frm=unit_from)
    op = "* 1000" if factor > 1 else "/ 1000"
    working = f"{fmt(value)} {unit_from} {op} = {fmt(result)} {unit_to}."
    return Item("mass_units", prompt, working, fmt(result))


def infusion_rate(rng: random.Random) -> Item:
    rate = rng.randrange(10, 201, 5)
    hours = rng.choice((1, 2, 3, 4, 5, 6, 8, 10, 12, 24))
    volume = rate * hours
    template = rng.choice(
        (
            "An IV bag holds {v} mL and must run over {t}. What is the rate in mL per hour?",
            "Infusion exercise: {v} mL is to be given over {t}. How many mL/h is that?",
            "At what rate in mL/h should a pump be set to deliver {v} mL in {t}?",
            "Calculate the hourly infusion rate for {v} mL of fluid given over {t}.",
        )
    )
    prompt = template.format(v=volume, t=plural(hours, "hour"))
    return Item("infusion_rate", prompt, f"{volume} mL / {hours} h = {rate} mL/h.", str(rate))


def infusion_volume(rng: random.Random) -> Item:
    rate = rng.randrange(10, 251, 5)
    hours = rng.randint(1, 12)
    volume = rate * hours
    template = rng.choice(
        (
            "A pump runs at {r} mL/h for {t}. How many mL are delivered?",
            "Infusion exercise: {r} mL per hour for {t}. What total volume is given in mL?",
            "How much fluid in mL does an infusion at {r} mL/h deliver over {t}?",
            "Calculate the total volume infused at a rate of {r} mL/h over {t}.",
        )
    )
    prompt = template.format(r=rate, t=plural(hours, "hour"))
    return Item("infusion_volume", prompt, f"{rate} mL/h * {hours} h = {volume} mL.", str(volume))


def bmi(rng: random.Random) -> Item:
    height_cm = rng.randrange(150, 196, 5)
    weight = rng.randint(45, 120)
    height = height_cm / 100
    squared = height * height
    value = round(weight / squared, 1)
    template = rng.choice(
        (
            "What is the BMI of someone who weighs {w} kg and is {h} m tall? Round to one decimal place.",
            "Calculate body mass index for a height of {h} m and a weight of {w} kg, to one decimal.",
            "A person is {cm} cm tall and weighs {w} kg. What is their BMI to one decimal place?",
            "BMI exercise: weight {w} kg, height {h} m. Give the BMI rounded to 0.1.",
        )
    )
    h = fmt(height, 2)
    prompt = template.format(w=weight, h=h, cm=height_cm)
    working = f"BMI = {weight} / ({h} * {h}) = {weight} / {fmt(squared, 4)} = {fmt(value, 1)}."
    return Item("bmi", prompt, working, fmt(value, 1))


def tablets_course(rng: random.Random) -> Item:
    strength = rng.choice((5, 10, 20, 25, 50, 100, 250, 500))
    per_dose = rng.choice((1, 2, 3))
    freq = rng.randint(1, 4)
    days = rng.choice((3, 5, 7, 10, 14, 21, 28, 30))
    dose = strength * per_dose
    total = per_dose * freq * days
    template = rng.choice(
        (
            "A course is {d} mg {f} for {n} days, using {s} mg tablets. How many tablets are needed?",
            "How many {s} mg tablets cover a {n}-day course of {d} mg taken {f}?",
            (
                "Pharmacy maths: {d} mg per dose, {k} a day, for {n} days, with {s} mg tablets. How many "
                "tablets in total?"
            ),
            ("Tablets of {s} mg are available. The schedule is {d} mg {f} for {n} days. How many tablets does it use?"),
        )
    )
    prompt = template.format(d=dose, f=_TIMES_A_DAY[freq], n=days, s=strength, k=plural(freq, "dose"))
    per = plural(per_dose, "tablet")
    working = f"{dose} / {strength} = {per} per dose; {per_dose} * {freq} * {days} = {total}."
    return Item("tablets_course", prompt, working, str(total))


def daily_dose(rng: random.Random) -> Item:
    dose = rng.randrange(25, 1001, 25)
    if rng.random() < 0.5:
        every = rng.choice((4, 6, 8, 12))
        count = 24 // every
        template = rng.choice(
            (
                "If {d} mg is given every {h} hours, how many mg are given in 24 hours?",
                "A dose of {d} mg is taken every {h} hours around the clock. What is the daily total in mg?",
                "Daily total exercise: {d} mg every {h} hours. How many mg per day?",
                "How many milligrams a day is {d} mg every {h} hours?",
            )
        )
        working = f"24 / {every} = {count} doses; {dose} mg * {count} = {dose * count} mg."
        return Item("daily_dose", template.format(d=dose, h=every), working, str(dose * count))
    count = rng.randint(1, 4)
    template = rng.choice(
        (
            "{M} is taken as {d} mg {f}. What is the total daily dose in mg?",
            "Daily total exercise: {d} mg per dose, {k} per day. How many mg per day?",
            "How many milligrams a day is {d} mg taken {f}?",
            "What is the total daily amount of {m} taken at {d} mg {f}?",
        )
    )
    medicine = rng.choice(_MEDICINES)
    prompt = template.format(
        M=medicine[0].upper() + medicine[1:],
        m=medicine,
        d=dose,
        f=_TIMES_A_DAY[count],
        k=plural(count, "dose"),
    )
    return Item("daily_dose", prompt, f"{dose} mg * {count} = {dose * count} mg.", str(dose * count))


def fluid_total(rng: random.Random) -> Item:
    amounts = [rng.randrange(100, 601, 50) for _ in range(3)]
    total = sum(amounts)
    template = rng.choice(
        (
            "Someone drinks {a} mL, {b} mL and {c} mL of water during a day. What is the total in mL?",
            "Fluid intake exercise: {a} mL at breakfast, {b} mL at lunch and {c} mL at dinner. Total mL?",
            "A fluid chart lists drinks of {a} mL, {b} mL and {c} mL. How many mL were taken in all?",
            "Add up these fluid intakes in mL: {a}, {b} and {c}.",
        )
    )
    prompt = template.format(a=amounts[0], b=amounts[1], c=amounts[2])
    working = f"{amounts[0]} + {amounts[1]} + {amounts[2]} = {total} mL."
    return Item("fluid_total", prompt, working, str(total))


# (mg, mL) stock strengths written the way labels usually state them.
_STRENGTHS = (
    (125, 5),
    (250, 5),
    (200, 5),
    (100, 5),
    (120, 5),
    (500, 10),
    (50, 1),
    (100, 1),
    (40, 1),
    (10, 1),
    (20, 1),
    (25, 1),
)
_VOLUMES = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8, 10, 12.5, 15, 20)


def liquid_dose(rng: random.Random) -> Item:
    mg, ml = rng.choice(_STRENGTHS)
    volume = rng.choice(_VOLUMES)
    # Choose the volume first and derive the dose, so the answer is always one of the friendly volumes.
    dose = mg / ml * volume
    template = rng.choice(
        (
            "A liquid medicine contains {c} mg in {v} mL. How many mL hold {d} mg?",
            "Stock strength is {c} mg per {v} mL and the dose required is {d} mg. What volume in mL?",
            "How many millilitres of a {c} mg per {v} mL syrup give a {d} mg dose?",
            "Dose calculation exercise: want {d} mg, have {c} mg in {v} mL. What volume in mL?",
        )
    )
    prompt = template.format(c=mg, v=ml, d=fmt(dose))
    working = f"{fmt(dose)} / {mg} * {ml} = {fmt(volume)} mL."
    return Item("liquid_dose", prompt, working, fmt(volume))


@DOMAINS.register("medical")
class Medical(NumericDomain):
    """Dosage and unit-conversion arithmetic exercises with a single numeric answer (2% tolerance)."""

    name = "medical"
    rel_tol = 0.02
    tasks = (
        weight_dose,
        weight_conversion,
        mass_units,
        infusion_rate,
        infusion_volume,
        bmi,
        tablets_course,
        daily_dose,
        fluid_total,
        liquid_dose,
    )
